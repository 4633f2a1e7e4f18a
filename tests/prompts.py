"""Prompts of different lengths that the tests run as one batch."""

PROMPTS = [
    "Hello world",
    "The quick brown fox",
    "Paged attention keeps keys and values in blocks of sixteen tokens each, and",
    "def add(a, b):",
    "Quantization stores each weight in",
    "Numbers: 0 1 2 3 4 5 6 7 8 9",
    "Bonjour le monde. Grüße aus Köln, naïve café",
    "A",
]
