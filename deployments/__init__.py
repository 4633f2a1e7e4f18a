"""Ray Serve deployments: an OpenAI-compatible ingress routing by model name to model servers."""
