import math

import torch

from openk2.serve.sampling import SamplingParams, process_logits, sample


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    def kept(**kw):
        return torch.isfinite(process_logits(logits, SamplingParams(temperature=1.0, **kw)))[0].tolist()

    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.5) == [True, False, False, False]  # the top token alone reaches 0.5
    assert kept(top_p=0.81) == [True, True, True, False]  # 0.5 + 0.3 < 0.81: the third is needed
    assert kept(top_p=0.81, top_k=2) == [True, True, False, False]


def test_processed_logprobs_are_of_the_renormalised_tempered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_k=2, seed=0)
    tok, lp = sample(logits, params, params.generators(1))
    assert tok.item() in (0, 1)
    assert math.isclose(lp.item(), math.log([0.5, 0.3][tok.item()] / 0.8), abs_tol=1e-6)
    raw = SamplingParams(temperature=1.0, top_k=2, seed=0, logprobs="raw")
    tok2, lp2 = sample(logits, raw, raw.generators(1))
    assert tok2.item() == tok.item() and math.isclose(lp2.item(), logits[0, tok.item()].item(), abs_tol=1e-6)
