"""The Reward protocol and the set of configured rewards.

A reward maps a `RewardInput` of N samples to `RewardOutput.scores` [N] float32. NaN means the reward
abstains for that sample (no target text in the prompt, a judge that could not be parsed, a server that
did not answer): it is never replaced by a silent neutral value. Advantage functions treat an abstaining
reward as absent for that sample; a configured fallback is used only when the user asks for one.

Rewards are built from `rewards[]` config entries: `type` picks a registered class (or
``package.module:Class``), `args` are the class's keyword arguments and are checked against its
signature at start so a typo fails with the closest valid name.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..registry import REWARDS, did_you_mean
from ..types import RewardInput, RewardOutput


class Reward:
    """Base class. Subclasses implement `score`; remote rewards override `score_async` too."""

    #: True for rewards whose scoring mostly waits on I/O (remote judges): the loop may overlap them
    is_remote: bool = False

    def __init__(self, name: str = "") -> None:
        self.name = name or type(self).__name__

    def score(self, inp: RewardInput) -> RewardOutput:
        raise NotImplementedError

    def __call__(self, inp: RewardInput) -> RewardOutput:
        return check_scores(self.name, self.score(inp), len(inp))

    async def score_async(self, inp: RewardInput) -> RewardOutput:
        """Default: run the blocking scorer in a worker thread so other work proceeds."""
        return await asyncio.to_thread(self.__call__, inp)

    @staticmethod
    def own_details(details: dict[str, Any], name: str) -> dict[str, Any]:
        """The entries `<name>/<key>` of a table's details, as {key: value} (what `rescore` receives)."""
        return {k[len(name) + 1:]: v for k, v in details.items() if k.startswith(name + "/")}

    def rescore(self, details: dict[str, Any], group_ids: torch.Tensor) -> torch.Tensor | None:
        """Scores [N] recomputed over the whole batch from this reward's own `details` (its keys without the
        '<name>/' prefix), concatenated over the scoring chunks of an overlapped step; None = the chunks' scores
        stand. Only rewards whose score of a sample depends on other groups' samples (a composite that imputes an
        abstaining child with the batch mean) need it: with it, overlapped scoring gives the sequential numbers."""
        return None

    def close(self) -> None:
        """Release servers, sessions or models."""


class RewardError(RuntimeError):
    """A reward cannot work as configured (server down, wrong key, scorer bug): stop with the fix."""


class BadScoresError(RewardError):
    """A scorer returned another number of scores than samples, or an infinite score: a bug in the scorer."""


def check_scores(name: str, out: RewardOutput, n: int) -> RewardOutput:
    """A score count other than the sample count, or an infinite score, is a bug in the scorer, not an abstain:
    fail loudly, naming the reward (also for rewards that override score_async and so bypass __call__)."""
    if tuple(out.scores.shape) != (n,):
        raise BadScoresError(f"reward '{name}' returned scores of shape {tuple(out.scores.shape)} for {n} samples "
                             f"(one score per sample, NaN to abstain)")
    if torch.isinf(out.scores).any():
        raise BadScoresError(
            f"reward '{name}' returned an infinite score; fix the scorer (NaN is allowed and means 'abstain')"
        )
    return out


# The config path of the reward being built (e.g. rewards[0]), so that a composite's children report theirs as
# rewards[0].args.children[1] (a path the user can find in the YAML).
_BUILDING: contextvars.ContextVar[str] = contextvars.ContextVar("imagerl_reward_field", default="")


def building_field() -> str:
    """Inside a reward's constructor called by `build_reward`: its config path ('' elsewhere)."""
    return _BUILDING.get()


def build_reward(spec: Any, index: int | str = 0, field: str = "") -> Reward:
    """Instantiate one reward from a `RewardSpec`-like object (type, name, weight, args); errors name
    `field` (default rewards[<index>])."""
    rtype = spec["type"] if isinstance(spec, dict) else spec.type
    args = spec.get("args") if isinstance(spec, dict) else spec.args
    name = (spec.get("name", "") if isinstance(spec, dict) else spec.name) or rtype.split(":")[-1]
    field = field or f"rewards[{index}]"
    if args is not None and not isinstance(args, Mapping):
        raise ValueError(f"{field}.args must be a mapping of keyword arguments (e.g. args: {{tolerance: 0.3}}), got {args!r}")
    args = dict(args or {})  # (`args:` with nothing after it is YAML null: no arguments)
    try:
        cls = REWARDS.get(rtype, field=f"{field}.type")
    except KeyError as e:
        raise ValueError(str(e)) from None
    check_kwargs(cls, args, f"{field}.args")
    token = _BUILDING.set(field)
    try:
        return cls(name=name, **args)
    except TypeError as e:
        raise ValueError(f"{field} ({rtype}): {e}") from e
    finally:
        _BUILDING.reset(token)


def check_kwargs(cls: Any, args: dict[str, Any], field: str) -> None:
    """Fail on keyword arguments the class does not take, naming the closest valid one."""
    sig = inspect.signature(cls.__init__)
    params = [p for p in sig.parameters.values() if p.name not in ("self", "name")]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for k in args:
        if k not in valid:
            hint = did_you_mean(k, valid)
            raise ValueError(f"{field}.{k}: unknown argument for {cls.__name__}.{hint} Valid: {', '.join(valid) or '(none)'}")
    missing = [p.name for p in params if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in args]
    if missing:
        raise ValueError(f"{field}: {cls.__name__} needs argument(s) {', '.join(missing)}; add them under args:")
    _check_arg_types(cls, args, field)


def _check_arg_types(cls: Any, args: dict[str, Any], field: str) -> None:
    """Numbers and switches by the constructor's annotations: `tolerance: abc` would otherwise fail inside the
    reward as "'<' not supported between 'int' and 'str'". Only int / float / bool (optionally None) are checked;
    an int is a valid float. Annotations that cannot be resolved are not checked."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001  (forward references of a user's class: leave its arguments alone)
        return
    for k, v in args.items():
        hint = hints.get(k)
        options = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
        if v is None and type(None) in options:
            continue
        options.discard(type(None))
        if not options or not options <= {int, float, bool}:
            continue
        ok = (isinstance(v, bool) and bool in options) or (
            not isinstance(v, bool) and ((isinstance(v, int) and options & {int, float}) or (isinstance(v, float) and float in options)))
        if not ok:
            want = " or ".join(sorted(t.__name__ for t in options))
            raise ValueError(f"{field}.{k}={v!r} must be {'a' if want != 'int' else 'an'} {want} ({cls.__name__})")


def group_chunks(group_ids: torch.Tensor | None, n: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of at most `size` samples that never split a run of equal group ids (runs are packed
    greedily; a run longer than `size` is a range of its own). Without group ids: plain chunks of `size`."""
    if group_ids is None:
        return [(lo, min(lo + size, n)) for lo in range(0, n, size)]
    g = group_ids.reshape(-1).tolist()
    runs, start = [], 0
    for i in range(1, n + 1):
        if i == n or g[i] != g[i - 1]:
            runs.append((start, i))
            start = i
    out: list[tuple[int, int]] = []
    for lo, hi in runs:
        if out and hi - out[-1][0] <= size:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


@dataclass
class ScoreTable:
    """Scores of every configured reward for one batch."""

    names: list[str]  # [R]
    scores: torch.Tensor  # [N, R] float32, NaN = abstain
    weights: torch.Tensor  # [N, R] per-sample weights (per-dataset reward weights applied)
    details: dict[str, Any]
    group_ids: torch.Tensor | None = None  # [N] the samples' groups (for abstains: see combined_reward)

    def weighted_total(self, fallback: float | None = None) -> torch.Tensor:
        """Weighted sum over rewards -> [N], abstains handled as for the advantages
        (`algorithms.advantages.combined_reward`)."""
        from ..algorithms.advantages import combined_reward

        s = self.scores if fallback is None else torch.nan_to_num(self.scores, nan=fallback)
        return combined_reward(s, self.weights, self.group_ids)


class RewardSet:
    """The configured rewards, scored together. Async-aware so remote judges run concurrently."""

    def __init__(self, specs: list[Any]):
        self.rewards: list[Reward] = [build_reward(s, i) for i, s in enumerate(specs)]
        self.weights = [float(s.get("weight", 1.0) if isinstance(s, dict) else s.weight) for s in specs]
        self.names = unique_names([r.name for r in self.rewards])
        for r, n in zip(self.rewards, self.names):
            r.name = n

    @property
    def any_remote(self) -> bool:
        return any(r.is_remote for r in self.rewards)

    def weight_matrix(self, n: int, per_sample: list[dict[str, float]] | None = None) -> torch.Tensor:
        """[N, R] weights; per-sample overrides (per-dataset reward weights) win over the global ones."""
        w = torch.tensor(self.weights, dtype=torch.float32).repeat(n, 1)
        if per_sample:
            for i, overrides in enumerate(per_sample):
                for j, name in enumerate(self.names):
                    if overrides and name in overrides:
                        w[i, j] = float(overrides[name])
        return w

    def rescore(self, table: ScoreTable) -> ScoreTable:
        """The table of a step scored in chunks (`scoring.overlap`), with every reward's column recomputed over
        the whole batch where the reward needs it (`Reward.rescore`)."""
        if table.group_ids is None:
            return table
        scores = table.scores.clone()
        for j, (name, r) in enumerate(zip(self.names, self.rewards)):
            new = r.rescore(Reward.own_details(table.details, name), table.group_ids)
            if new is not None:
                scores[:, j] = new.float().cpu()
        return ScoreTable(table.names, scores, table.weights, table.details, table.group_ids)

    async def score_async(self, inp: RewardInput, per_sample_weights: list[dict[str, float]] | None = None) -> ScoreTable:
        outs = await asyncio.gather(*(r.score_async(inp) for r in self.rewards))
        return self._table(inp, list(outs), per_sample_weights)

    def score(self, inp: RewardInput, per_sample_weights: list[dict[str, float]] | None = None) -> ScoreTable:
        if self.any_remote:
            return run_sync(self.score_async(inp, per_sample_weights))
        return self._table(inp, [r(inp) for r in self.rewards], per_sample_weights)

    def _table(self, inp: RewardInput, outs: list[RewardOutput], per_sample_weights: list[dict[str, float]] | None) -> ScoreTable:
        details: dict[str, Any] = {}
        cols = []
        for name, out in zip(self.names, outs):
            check_scores(name, out, len(inp))
            cols.append(out.scores.float().cpu())
            for k, v in out.details.items():
                details[f"{name}/{k}"] = v
        scores = torch.stack(cols, 1) if cols else torch.zeros(len(inp), 0)
        return ScoreTable(self.names, scores, self.weight_matrix(len(inp), per_sample_weights), details, inp.group_ids)

    def close(self) -> None:
        for r in self.rewards:
            r.close()


def run_sync(coro: Any) -> Any:
    """Run a coroutine from synchronous code, also when called inside a running loop's thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


def unique_names(names: list[str]) -> list[str]:
    """Metric names made distinct: a repeated name gets _1, _2, ... (rewards, and the trainer's eval sets)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}_{seen[n]}")
        else:
            seen[n] = 0
            out.append(n)
    return out
