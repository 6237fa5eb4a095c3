"""The EMA of the trained weights against hand-computed values; swapping it in and out is exact."""

import pytest
import torch

from imagerl.config import ConfigError, load_config
from imagerl.ema import WeightEMA, ema_decay


def test_decay_warms_up_then_caps():
    # (1 + k) / (10 + k): 0.1, 2/11, 3/12, ... capped at the configured decay
    assert [round(ema_decay(0.9, k), 6) for k in (0, 1, 2, 80, 1000)] == [0.1, round(2 / 11, 6), 0.25, 0.9, 0.9]
    assert ema_decay(0.2, 5) == 0.2


def test_updates_every_n_steps_match_hand_computed_values():
    w = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    ema = WeightEMA([("w", w)], decay=0.9, every=2)
    table = []  # (optimizer steps, weights after that step, expected average)
    # step 1: no update (every=2); step 2: d = 0.1 -> 0.1 * [0, 10] + 0.9 * [2, 2] = [1.8, 2.8]
    # step 3: no update; step 4: d = 2/11 -> (2/11) * [1.8, 2.8] + (9/11) * [4, -4]
    expected4 = torch.tensor([2 / 11 * 1.8 + 9 / 11 * 4, 2 / 11 * 2.8 + 9 / 11 * -4])
    for step, value, want in ((1, [1.0, 1.0], [0.0, 10.0]), (2, [2.0, 2.0], [1.8, 2.8]), (3, [3.0, 0.0], [1.8, 2.8]),
                              (4, [4.0, -4.0], expected4.tolist())):
        with torch.no_grad():
            w.copy_(torch.tensor(value))
        ema.update(step)
        table.append((step, ema.state_dict()["w"].tolist(), want))
    for step, got, want in table:
        assert got == pytest.approx(want, abs=1e-6), step


def test_applied_swaps_the_average_in_and_restores_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).to(torch.bfloat16)  # the average is fp32 whatever the weights' dtype
    named = list(lin.named_parameters())
    ema = WeightEMA(named, decay=0.5, every=1)
    assert all(s.dtype == torch.float32 for s in ema.state_dict().values())
    trained = {n: p.detach().clone() for n, p in named}
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    ema.update(1)  # d = 0.1: mostly the new weights
    after = {n: p.detach().clone() for n, p in named}
    with ema.applied():
        for n, p in named:
            assert torch.equal(p, ema.state_dict()[n].to(p.dtype))
            assert not torch.equal(p, after[n])
    for n, p in named:
        assert torch.equal(p, after[n]) and not torch.equal(p, trained[n])
    with pytest.raises(RuntimeError), ema.applied():  # restored even when the body fails
        raise RuntimeError("boom")
    assert all(torch.equal(p, after[n]) for n, p in named)


@pytest.mark.parametrize("override,match", [("optim.ema_decay=1.0", "optim.ema_decay=1.0 must be in"),
                                            ("optim.ema_every=0", "optim.ema_every=0 must be >= 1")])
def test_bad_ema_settings_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.tiny=true", override])
