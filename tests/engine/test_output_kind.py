"""`output_kind`: what `LLMEngine.step()` reports for a request."""

from __future__ import annotations

from engine import RequestOutputKind, SamplingParams
from tests.engine.test_detokenizer import DEMO_MODEL


def test_final_only_reports_once_with_the_same_output_as_cumulative():
    from engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=str(DEMO_MODEL), quantization="bitsandbytes"))
    outputs: dict[str, list] = {"cumulative": [], "final": []}
    for request_id, kind in (("cumulative", RequestOutputKind.CUMULATIVE),
                             ("final", RequestOutputKind.FINAL_ONLY)):  # fmt: skip
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, output_kind=kind)
        engine.add_request(request_id, "A dictionary", params, prompt_token_ids=[5, 6, 7, 8])
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].append(output)
    assert len(outputs["cumulative"]) == 8 and len(outputs["final"]) == 1
    final, last = outputs["final"][0], outputs["cumulative"][-1]
    assert final.finished and last.finished
    assert final.outputs[0].token_ids == last.outputs[0].token_ids
    assert final.outputs[0].text == last.outputs[0].text
