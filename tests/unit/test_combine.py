"""Reward combinations: NaN (abstain) semantics on hand-computed tables, and nested specs end to end.

The children used end to end are small rule rewards defined here and referenced the way users reference
their own code, as ``test_combine:MetadataScore`` (pytest puts this directory on sys.path).
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from imagerl.rewards.base import Reward, build_reward
from imagerl.rewards.combine import (
    gated_scores,
    group_normalize,
    max_deviation_scores,
    product_scores,
    weighted_sum_scores,
)
from imagerl.types import RewardInput, RewardOutput

NAN = math.nan


def close(a: torch.Tensor, b: list[float]) -> bool:
    return torch.allclose(a, torch.tensor(b, dtype=a.dtype), rtol=1e-5, atol=1e-6, equal_nan=True)


class MetadataScore(Reward):
    """A rule reward: the number stored under metadata[key] (NaN when the field is missing)."""

    def __init__(self, *, key: str, name: str = "") -> None:
        super().__init__(name)
        self.key = key

    def score(self, inp: RewardInput) -> RewardOutput:
        vals = [float(m.get(self.key, NAN)) for m in inp.metadata]
        return RewardOutput(torch.tensor(vals), details={"seen": len(vals)})


class AsyncMetadataScore(MetadataScore):
    """The same, declared remote with a native coroutine (exercises the concurrent path)."""

    is_remote = True
    calls = 0

    async def score_async(self, inp: RewardInput) -> RewardOutput:
        await asyncio.sleep(0)
        type(self).calls += 1
        return self.score(inp)


def child(key: str, weight: float = 1.0, remote: bool = False) -> dict:
    cls = "AsyncMetadataScore" if remote else "MetadataScore"
    return {"type": f"test_combine:{cls}", "name": key, "weight": weight, "args": {"key": key}}


def batch(rows: list[dict], groups: list[int] | None = None) -> RewardInput:
    n = len(rows)
    return RewardInput(images=torch.zeros(n, 3, 2, 2), prompts=["p"] * n, metadata=rows,
                       group_ids=torch.tensor(groups) if groups is not None else None)


# ---------------------------------------------------------------------------------------------- pure rules


def test_weighted_sum_table():
    s = torch.tensor([[1.0, 2.0], [NAN, 2.0], [NAN, NAN], [4.0, NAN]])
    w = torch.tensor([1.0, 3.0])
    # skip, no groups (one group): an abstaining child counts as its mean over the batch (child 0: 2.5, child 1: 2):
    # row1 = 2.5 + 3*2 = 8.5, row3 = 4 + 3*2 = 10; row2 scored by nobody stays NaN
    assert close(weighted_sum_scores(s, w, "skip"), [7.0, 8.5, NAN, 10.0])
    # with groups {0, 1} and {2, 3}: child 0's mean in group 0 is 1, child 1's in group 1 is 2 (row 2 abstained)
    assert close(weighted_sum_scores(s, w, "skip", torch.tensor([0, 0, 1, 1])), [7.0, 7.0, NAN, 10.0])
    # a penalty (negative weight) that abstains is not a bonus: rows [.8, .4], [.8, NaN], [.8, 0] -> 0.4, 0.6, 0.8
    pen = torch.tensor([[0.8, 0.4], [0.8, NAN], [0.8, 0.0]])
    assert close(weighted_sum_scores(pen, torch.tensor([1.0, -1.0])), [0.4, 0.6, 0.8])
    assert close(weighted_sum_scores(s, w, "any"), [7.0, NAN, NAN, NAN])
    assert close(weighted_sum_scores(torch.tensor([[1.0, 2.0]]), torch.tensor([1.0, -1.0])), [-1.0])
    with pytest.raises(ValueError, match="nan_mode"):
        weighted_sum_scores(s, w, "mean")


def test_gated_table():
    gate = torch.tensor([0.9, 0.2, NAN, 0.5, 0.7])
    value = torch.tensor([3.0, 3.0, 3.0, 4.0, NAN])
    assert close(gated_scores(gate, value, 0.5), [3.0, 0.0, NAN, 4.0, NAN])  # threshold inclusive
    assert close(gated_scores(gate, value, 0.5, below=-1.0), [3.0, -1.0, NAN, 4.0, NAN])


def test_product_table():
    s = torch.tensor([[0.5, 0.8], [NAN, 1.0], [2.0, 3.0], [0.0, 0.5]])
    assert close(product_scores(s, torch.tensor([1.0, 2.0])), [0.32, NAN, 18.0, 0.0])
    assert close(product_scores(torch.tensor([[-2.0, 3.0]]), torch.tensor([3.0, 1.0])), [-24.0])  # integer power ok
    with pytest.raises(ValueError, match="child 0.*non-integer"):
        product_scores(torch.tensor([[-0.5, 1.0]]), torch.tensor([0.5, 1.0]))
    # an abstaining child abstains the product also at weight 0 (NaN ** 0 is 1 in torch), and 0 under a negative
    # exponent is a configuration error named as such (it was an infinite score blamed on "the scorer")
    assert close(product_scores(torch.tensor([[NAN, 0.5]]), torch.tensor([0.0, 1.0])), [NAN])
    with pytest.raises(ValueError, match=r"child 1 scored 0 under a negative weight"):
        product_scores(torch.tensor([[0.5, 0.0]]), torch.tensor([1.0, -1.0]))


def test_group_normalize_and_max_deviation_table():
    # groups: 0 = rows 0-2, 1 = rows 3-4, 2 = row 5 (every child abstains there)
    s = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0], [5.0, 1.0], [5.0, NAN], [NAN, NAN]])
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    z = group_normalize(s, g)
    # child A, group 0: mean 2, population std sqrt(2/3)  -> z = -/+ sqrt(3/2)
    # child B, group 0: mean 1, std sqrt(2)              -> z = -1/sqrt2, -1/sqrt2, sqrt2
    # group 1: A constant -> 0 ; B one valid value -> 0 (no information) and NaN where it abstains
    r15, r2 = math.sqrt(1.5), math.sqrt(2.0)
    assert close(z[:, 0], [-r15, 0.0, r15, 0.0, 0.0, NAN])
    assert close(z[:, 1], [-1 / r2, -1 / r2, r2, 0.0, NAN, NAN])
    res = max_deviation_scores(s, g, torch.tensor([1.0, 1.0]))
    assert close(res.scores, [-r15, -1 / r2, r2, 0.0, 0.0, NAN])
    assert res.chosen.tolist() == [0, 1, 1, 0, 0, -1]  # tie at row 3 -> lower index
    weighted = max_deviation_scores(s, g, torch.tensor([2.0, 1.0]))
    assert close(weighted.scores, [-2 * r15, -1 / r2, 2 * r15, 0.0, 0.0, NAN])  # row 1: A has z = 0
    assert weighted.chosen.tolist()[:3] == [0, 1, 0]


# ---------------------------------------------------------------------------------------------- reward classes


def test_weighted_sum_reward_from_nested_specs():
    r = build_reward({"type": "weighted_sum", "name": "total",
                      "args": {"children": [child("a", 1.0), child("b", 3.0)]}})
    out = r(batch([{"a": 1, "b": 2}, {"b": 2}, {}]))
    assert close(out.scores, [7.0, 7.0, NAN])  # row 1: a abstained, counts as its batch mean 1 -> 1 + 3 * 2
    assert out.details["a/score"][0] == 1.0 and math.isnan(out.details["a/score"][1])
    assert out.details["b/seen"] == 3  # children's details are kept under their names
    strict = build_reward({"type": "weighted_sum", "args": {"children": [child("a"), child("b")], "nan_mode": "any"}})
    assert close(strict(batch([{"a": 1, "b": 2}, {"b": 2}])).scores, [3.0, NAN])


@pytest.mark.parametrize("remote", [False, True])
def test_a_child_with_an_infinite_score_stops_the_combination(remote):
    # (torch.nan_to_num in the weighted sum would have made it float32's max: reward/mean 8.5e37 in a run)
    from imagerl.rewards.base import BadScoresError

    for kind in ("weighted_sum", "max_deviation"):
        r = build_reward({"type": kind, "name": "mix", "args": {"children": [child("a", remote=remote), child("b")]}})
        with pytest.raises(BadScoresError, match=r"^reward '(mix.)?a' returned an infinite score"):
            asyncio.run(r.score_async(batch([{"a": math.inf, "b": 1.0}, {"a": 1.0, "b": 2.0}], [0, 0])))


def test_gated_and_product_rewards():
    g = build_reward({"type": "gated", "args": {"gate": child("ocr"), "value": child("aesthetic"), "threshold": 0.8}})
    out = g(batch([{"ocr": 0.9, "aesthetic": 6.0}, {"ocr": 0.1, "aesthetic": 9.0}, {"aesthetic": 9.0}]))
    assert close(out.scores, [6.0, 0.0, NAN])
    assert out.details["gate_passed"] == 1
    p = build_reward({"type": "product", "args": {"children": [child("a"), child("b", 2.0)]}})
    assert close(p(batch([{"a": 0.5, "b": 0.5}, {"a": 0.5}])).scores, [0.125, NAN])


def test_max_deviation_reward_uses_group_ids():
    r = build_reward({"type": "max_deviation", "args": {"children": [child("a"), child("b")]}})
    rows = [{"a": 1, "b": 0}, {"a": 2, "b": 0}, {"a": 3, "b": 3}]
    out = r(batch(rows, groups=[4, 4, 4]))
    assert close(out.scores, [-math.sqrt(1.5), -1 / math.sqrt(2), math.sqrt(2)])
    assert out.details["chosen/a"] == 1 and out.details["chosen/b"] == 2
    # separate groups of one: nothing deviates
    assert close(r(batch(rows, groups=[1, 2, 3])).scores, [0.0, 0.0, 0.0])


def test_remote_child_makes_combination_remote_and_concurrent():
    AsyncMetadataScore.calls = 0
    r = build_reward({"type": "weighted_sum", "args": {"children": [child("a", remote=True), child("b")]}})
    assert r.is_remote
    out = r(batch([{"a": 1, "b": 1}]))  # sync call runs the async path
    assert close(out.scores, [2.0]) and AsyncMetadataScore.calls == 1


def test_nested_combinations_and_duplicate_names():
    inner = {"type": "product", "name": "inner", "args": {"children": [child("a"), child("a")]}}
    r = build_reward({"type": "weighted_sum", "args": {"children": [inner, child("b", 0.5)]}})
    out = r(batch([{"a": 3, "b": 4}]))
    assert close(out.scores, [9.0 + 2.0])
    assert {"inner/a/score", "inner/a_1/score"} <= set(out.details)  # duplicate child names made unique


def test_bad_child_specs_name_the_field():
    with pytest.raises(ValueError, match="children must be a non-empty list"):
        build_reward({"type": "weighted_sum", "args": {"children": []}})
    with pytest.raises(ValueError, match=r"^rewards\[0\].args.children\[1\].type: unknown reward 'ocrr'.*Did you mean 'ocr'"):
        build_reward({"type": "weighted_sum", "name": "sum", "args": {"children": [child("a"), {"type": "ocrr"}]}})
    with pytest.raises(ValueError, match=r"^rewards\[0\].args.children\[0\].type: cannot import module 'no_such_pkg'"):
        build_reward({"type": "weighted_sum", "name": "sum", "args": {"children": [{"type": "no_such_pkg:Reward"}]}})
    # nested two deep, at index 2: the path as written in the YAML
    inner = {"type": "weighted_sum", "args": {"children": [{"type": "brightness", "args": {"targte": "dark"}}]}}
    with pytest.raises(ValueError, match=r"^rewards\[2\].args.children\[0\].args.children\[0\].args.targte: unknown argument"):
        build_reward({"type": "weighted_sum", "args": {"children": [inner]}}, 2)
    with pytest.raises(ValueError, match="expected a reward spec"):
        build_reward({"type": "gated", "args": {"gate": "ocr", "value": child("a")}})
    with pytest.raises(ValueError, match="weight must be a number"):
        build_reward({"type": "product", "args": {"children": [dict(child("a"), weight="heavy")]}})
    with pytest.raises(ValueError, match=r"args.children\[0\].weight=nan must be a finite number"):
        build_reward({"type": "weighted_sum", "args": {"children": [dict(child("a"), weight=float("nan"))]}})
    from imagerl.rewards.remote import RemoteReward

    with pytest.raises(ValueError, match=r"^remote reward 'r': args.weights.s=inf must be a finite number"):
        RemoteReward(url="http://127.0.0.1:9", rewards=["s"], weights={"s": float("inf")}, name="r")


def test_own_reward_module_imports_from_the_working_directory(tmp_path, monkeypatch):
    """`imagerl train` is a console script, so the directory it runs in is not on sys.path (as it is under
    `python -m`); a user's reward module there must still import by 'module:Class'. A dependency missing inside
    that module stays its own error, naming the module that is missing."""
    import sys

    (tmp_path / "my_cwd_reward_mod.py").write_text(
        "import torch\nfrom imagerl.rewards.base import Reward\nfrom imagerl.types import RewardOutput\n"
        "class Half(Reward):\n    def score(self, inp):\n        return RewardOutput(torch.full((len(inp.prompts),), 0.5))\n")
    (tmp_path / "my_cwd_broken_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    r = build_reward({"type": "my_cwd_reward_mod:Half"})
    assert close(r(batch([{}, {}])).scores, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"module 'my_cwd_reward_mod' has no attribute 'Hlaf' .* Did you mean 'Half'\?$"):
        build_reward({"type": "my_cwd_reward_mod:Hlaf"})
    assert sys.path[-1] == str(tmp_path)  # appended: it shadows nothing installed
    with pytest.raises(ValueError, match=r"^rewards\[0\].type: module 'my_cwd_broken_mod' \(from 'my_cwd_broken_mod:X'\) "
                                         r"imports 'no_such_dependency_xyz', which is not installed: pip install it"):
        build_reward({"type": "my_cwd_broken_mod:X"})
    with pytest.raises(ValueError, match=r"^rewards\[0\].type: cannot import module 'no_such_user_mod_xyz' named in .*"
                                         r"\(it must be installed, on PYTHONPATH, or under the working directory"):
        build_reward({"type": "no_such_user_mod_xyz:X"})


def test_chunked_tables_concatenate_per_sample_details_and_rescore_over_the_batch():
    # scoring.overlap scores whole groups per rollout micro-batch; concat_tables joins them (per-sample tensors in
    # details too, not the last chunk's) and RewardSet.rescore recombines what depends on the whole batch
    from imagerl.rewards.base import RewardSet
    from imagerl.rewards.remote import RemoteReward
    from imagerl.rewards.runner import concat_tables

    rs = RewardSet([{"type": "weighted_sum", "name": "ws", "args": {"children": [
        {"type": "test_combine:MetadataScore", "name": "a", "args": {"key": "a"}},
        {"type": "test_combine:MetadataScore", "name": "b", "args": {"key": "b"}, "weight": 2.0}]}}])
    meta = [{"a": 1.0, "b": NAN}, {"a": 3.0, "b": NAN}, {"a": 0.0, "b": 4.0}, {"a": 2.0, "b": 8.0}]
    gid = torch.tensor([0, 0, 1, 1])
    inp = lambda rows: RewardInput(torch.zeros(len(rows), 3, 2, 2), ["p"] * len(rows), [meta[i] for i in rows], gid[rows])  # noqa: E731
    whole = rs.score(inp([0, 1, 2, 3]))
    chunked = concat_tables([rs.score(inp([0, 1])), rs.score(inp([2, 3]))])
    # group 0 has no b: b counts as the batch's mean of b (6), not the chunk's (none there: 0)
    assert close(whole.scores[:, 0], [1 + 12, 3 + 12, 0 + 8, 2 + 16])
    assert not torch.equal(chunked.scores, whole.scores)
    assert torch.equal(rs.rescore(chunked).scores, whole.scores)
    # a remote reward of several names keeps per-sample tensors per name: joined over chunks, rescored likewise
    t1 = ScoreTableFor(["r"], {"r/x": torch.tensor([1.0, 3.0]), "r/y": torch.tensor([NAN, NAN]), "r/failed_samples": 0}, [0, 0])
    t2 = ScoreTableFor(["r"], {"r/x": torch.tensor([0.0, 2.0]), "r/y": torch.tensor([4.0, 8.0]), "r/failed_samples": 1}, [1, 1])
    t = concat_tables([t1, t2])
    assert torch.equal(t.details["r/x"], torch.tensor([1.0, 3.0, 0.0, 2.0])) and t.details["r/failed_samples"] == 1
    t1.details["r/latency_s"], t2.details["r/latency_s"] = 0.5, 0.25  # overlapped chunks: the longest, not the sum
    assert concat_tables([t1, t2]).details["r/latency_s"] == 0.5
    r = RemoteReward(name="r", url="http://127.0.0.1:9", rewards=["x", "y"], weights={"y": 2.0})
    try:
        assert close(r.rescore({k[2:]: v for k, v in t.details.items()}, t.group_ids), [13.0, 15.0, 8.0, 18.0])
    finally:
        r.close()


def ScoreTableFor(names, details, gids):
    from imagerl.rewards.base import ScoreTable

    n = len(gids)
    return ScoreTable(names, torch.zeros(n, len(names)), torch.ones(n, len(names)), details, torch.tensor(gids))
