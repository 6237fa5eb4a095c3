"""VLM-judge rewards: a prompt template, a `JudgeBackend`, a parser and an aggregation rule.

All judges issue their requests concurrently (``asyncio.gather`` bounded by ``max_concurrency``), so a
batch of 300 samples costs a few round trips, not 300 sequential calls; `score_async` is the native
entry point and `score` runs it to completion. A request that fails for good (`JudgeError`) or an answer
that cannot be parsed makes that sample abstain (NaN) and is counted in ``details`` as
``request_failures`` / ``parse_failures``; ``fallback`` replaces NaN only when the user configures it.

- `YesNoJudge` (``yes_no_judge``): P(yes) / (P(yes) + P(no)) from the first answer token's top
  log-probs, as in VQAScore-style judging (Lin et al., 2024) but with a chat VLM; the text decides when the
  backend gives no log-probs.
- `VIEScoreJudge` (``viescore``): VIEScore (Ku et al., 2023). Departure: the paper's final score is
  sqrt(min(SC) * min(PQ)) on 0-10; we divide by 10 so it lies in [0, 1] like the other rewards.
- `PairwiseJudge` (``pairwise_judge``): win rate of each sample against the other members of its group,
  optionally asking both presentation orders to cancel the judge's position bias.
- `RubricJudge` (``rubric_judge``): weighted mean of several 0-10 dimensions (our design).
- `EditJudge` (``edit_judge``): "follows the instruction" and "preserves the rest", combined (our design).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ...types import RewardInput, RewardOutput
from ..base import Reward, RewardError, run_sync
from . import parsers, templates
from .backend import ChatResult, JudgeBackend, JudgeError, build_backend, image_to_data_uri

log = logging.getLogger(__name__)

NAN = math.nan


@dataclass
class _Call:
    """Per-`score_async` state: the concurrency bound and the failure counters for `details`."""

    sem: asyncio.Semaphore
    requests: int = 0
    request_failures: int = 0
    parse_failures: int = 0
    last_error: str = ""
    rejected: int = 0  # requests the server refused with a 4xx (a 400: one sample's image, or every request's setup)


# 4xx statuses that no retry or later request changes (the key, the model, the URL): the run stops with the fix
# instead of abstaining on every sample (beside other rewards the judge would silently stop carrying signal)
_SETUP_STATUS = (401, 403, 404)


@dataclass
class JudgeScores:
    """What a judge computes for a batch: scores [N] (NaN = abstain) and named per-sample parts [N]."""

    scores: list[float]
    parts: dict[str, list[float]] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)


def _instruction(inp: RewardInput, i: int) -> str:
    """The edit instruction of sample i: metadata ``instruction`` if the dataset has it, else the prompt."""
    md = inp.metadata[i] if inp.metadata and i < len(inp.metadata) else {}
    return str(md.get("instruction") or inp.prompts[i])


class JudgeReward(Reward):
    """Shared machinery: backend construction, bounded concurrent requests, failure accounting, fallback.

    Args (YAML ``args``):
        backend: ``{type: http|inprocess|package.module:Class, ...}`` (see judges/backend.py) or a backend
            object (tests, user code).
        max_concurrency: requests in flight at once (default 16).
        max_tokens: generation budget per request (each judge has its own default).
        temperature: sampling temperature of the judge (default 0: greedy, reproducible).
        fallback: score used for abstaining samples; None (default) keeps NaN.
        system_prompt: optional system message prepended to every request.
    """

    is_remote = True
    default_max_tokens = 64

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Subclasses forward the shared args with **kw; publish the merged signature so that config
        # checking (rewards.base.check_kwargs) still rejects a misspelt argument by name.
        super().__init_subclass__(**kwargs)
        own = inspect.signature(cls.__init__)
        if not any(p.kind is p.VAR_KEYWORD for p in own.parameters.values()):
            return
        params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        have = {p.name for p in params}
        shared = [p for p in inspect.signature(JudgeReward.__init__).parameters.values()
                  if p.kind is p.KEYWORD_ONLY and p.name not in have]
        cls.__init__.__signature__ = own.replace(parameters=params + shared)  # type: ignore[attr-defined]

    def __init__(
        self,
        *,
        backend: dict[str, Any] | JudgeBackend,
        name: str = "",
        max_concurrency: int = 16,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        fallback: float | None = None,
        system_prompt: str | None = None,
    ) -> None:
        super().__init__(name)
        if backend is None:
            raise ValueError(f"reward '{self.name}': args.backend is required, e.g. backend: {{type: http, base_url: http://127.0.0.1:8000/v1}}")
        if int(max_concurrency) < 1:
            raise ValueError(f"reward '{self.name}': args.max_concurrency must be >= 1, got {max_concurrency}")
        self.backend = build_backend(backend, field_name=f"reward '{self.name}' args.backend")
        if not callable(getattr(self.backend, "chat", None)):
            raise ValueError(f"reward '{self.name}': args.backend {type(self.backend).__name__} has no async chat() method")
        self.max_concurrency = int(max_concurrency)
        self.max_tokens = int(max_tokens) if max_tokens is not None else self.default_max_tokens
        self.temperature = float(temperature)
        self.fallback = None if fallback is None else float(fallback)
        self.system_prompt = system_prompt

    # ---- the entry points --------------------------------------------------------------------------

    def score(self, inp: RewardInput) -> RewardOutput:
        return run_sync(self.score_async(inp))

    async def score_async(self, inp: RewardInput) -> RewardOutput:
        call = _Call(sem=asyncio.Semaphore(self.max_concurrency))  # made here: it binds to the running loop
        uris = await asyncio.to_thread(lambda: [image_to_data_uri(img) for img in inp.images])
        res = await self._judge(inp, uris, call)
        if len(res.scores) != len(inp):
            raise RuntimeError(f"reward '{self.name}' produced {len(res.scores)} scores for {len(inp)} samples")
        if call.requests >= 2 and call.rejected == call.requests:
            # every request refused (a 400 for a field the server does not take, say): a setup error, not samples to
            # abstain on (beside other rewards the judge would silently carry no signal); one refused request of
            # several (an image too large) still only abstains its sample
            raise RewardError(f"reward '{self.name}': the judge server refused all {call.requests} requests; the last: "
                              f"{call.last_error[:500]}")
        abstained = sum(1 for s in res.scores if math.isnan(s))
        scores = [self.fallback if (math.isnan(s) and self.fallback is not None) else s for s in res.scores]
        details: dict[str, Any] = {
            "requests": call.requests,
            "request_failures": call.request_failures,
            "parse_failures": call.parse_failures,
            "abstained": abstained,
            **res.counters,
            **res.parts,
        }
        if call.last_error:  # (what the server said, once per call: abstains alone do not say why)
            details["last_error"] = call.last_error
            log.warning("reward '%s': %d of %d judge requests failed; last error: %s", self.name,
                        call.request_failures, call.requests, call.last_error[:500])
        return RewardOutput(scores=scores, details=details)

    async def _judge(self, inp: RewardInput, uris: list[str], call: _Call) -> JudgeScores:
        raise NotImplementedError

    # ---- helpers for subclasses --------------------------------------------------------------------

    async def _ask(
        self,
        call: _Call,
        text: str,
        image_uris: list[str],
        *,
        labels: list[str] | None = None,
        top_logprobs: int | None = None,
        max_tokens: int | None = None,
    ) -> ChatResult | None:
        """One request under the semaphore; None (and a counted failure) when the backend gives up."""
        msgs = templates.chat_messages(text, image_uris, system=self.system_prompt, labels=labels)
        async with call.sem:
            call.requests += 1
            try:
                return await self.backend.chat(
                    msgs,
                    max_tokens=max_tokens or self.max_tokens,
                    temperature=self.temperature,
                    top_logprobs=top_logprobs,
                )
            except (JudgeError, asyncio.TimeoutError) as e:
                status = getattr(e, "status", None)  # (http_client.RequestRejectedError; 401/403 name the key field)
                if status in _SETUP_STATUS:
                    fix = (". Check args.backend.base_urls (host, port and the /v1 path) and args.backend.model"
                           if status == 404 else "")
                    raise RewardError(f"reward '{self.name}': {e}{fix}") from None
                call.request_failures += 1
                call.rejected += status is not None
                call.last_error = str(e) or type(e).__name__
                return None

    @staticmethod
    def _parsed(call: _Call, value: Any) -> Any:
        """Count a parse failure when a parser returned nothing."""
        if value is None or (isinstance(value, dict) and not value):
            call.parse_failures += 1
        return value

    def _source_uris(self, inp: RewardInput) -> list[str]:
        if inp.source_images is None or len(inp.source_images) != len(inp):
            got = "None" if inp.source_images is None else f"{len(inp.source_images)} items"
            raise ValueError(
                f"reward '{self.name}' ({type(self).__name__}) judges edits and needs RewardInput.source_images "
                f"with one source image per sample ({len(inp)}), got {got}; use an editing dataset"
            )
        missing = [i for i, s in enumerate(inp.source_images) if s is None]
        if missing:
            raise ValueError(f"reward '{self.name}': RewardInput.source_images[{missing[0]}] is None; every edit needs its source image")
        return [image_to_data_uri(s) for s in inp.source_images]

    def close(self) -> None:
        closer = getattr(self.backend, "close", None) or getattr(self.backend, "aclose", None)
        if closer is None:
            return
        res = closer()
        if inspect.isawaitable(res):
            run_sync(res)


# --------------------------------------------------------------------------------------------------


class YesNoJudge(JudgeReward):
    """``yes_no_judge``: P(yes) that the image matches the prompt, from the first answer token.

    Args: ``template`` (placeholder ``{prompt}``; default `templates.YES_NO`), ``top_logprobs`` (how many
    alternatives to request per token, default 20, the OpenAI maximum), plus the `JudgeReward` args.
    Score in [0, 1]: the log-prob ratio when the backend returns log-probs, else 1/0 from the text;
    neither readable -> NaN.
    """

    default_max_tokens = 8  # one token decides; a few more let the text fallback see "Yes." / "**No**"

    def __init__(self, *, backend: dict[str, Any] | JudgeBackend, name: str = "", template: str = templates.YES_NO,
                 top_logprobs: int = 20, **kw: Any) -> None:
        super().__init__(backend=backend, name=name, **kw)
        templates.check_template(template, {"prompt"}, f"reward '{self.name}' args.template")
        self.template = template
        self.top_logprobs = int(top_logprobs)

    async def _judge(self, inp: RewardInput, uris: list[str], call: _Call) -> JudgeScores:
        sources = {"logprobs": 0, "text": 0}

        async def one(i: int) -> float:
            res = await self._ask(call, self.template.format(prompt=inp.prompts[i]), [uris[i]], top_logprobs=self.top_logprobs)
            if res is None:
                return NAN
            r = parsers.yes_no_probability(res.top_logprobs, res.text)
            if self._parsed(call, r.p_yes) is None:
                return NAN
            sources[r.source] += 1
            return float(r.p_yes)

        scores = await asyncio.gather(*(one(i) for i in range(len(inp))))
        return JudgeScores(list(scores), counters={"from_logprobs": sources["logprobs"], "from_text": sources["text"]})


class VIEScoreJudge(JudgeReward):
    """``viescore``: VIEScore, overall = sqrt(min(SC) * min(PQ)) / 10 in [0, 1].

    Args: ``task``: ``edit`` (SC = [editing success, over-editing] on the source and edited images),
    ``t2i`` (SC = [prompt alignment]) or ``auto`` (default: ``edit`` when the batch has source images);
    ``sc_template`` / ``pq_template`` to override the prompts (placeholders ``{prompt}`` for t2i,
    ``{instruction}`` for edit; none for PQ). The edit instruction is ``metadata["instruction"]`` when the
    dataset has one, else the prompt. Both requests of a sample run concurrently; if either fails, the
    sample abstains. ``details`` has the per-sample ``sc`` and ``pq`` minima on the 0-10 scale.
    """

    default_max_tokens = 384  # room for the short reasoning the template asks for, then the JSON scores

    def __init__(self, *, backend: dict[str, Any] | JudgeBackend, name: str = "", task: str = "auto",
                 sc_template: str | None = None, pq_template: str | None = None, **kw: Any) -> None:
        super().__init__(backend=backend, name=name, **kw)
        if task not in ("auto", "edit", "t2i"):
            raise ValueError(f"reward '{self.name}': args.task must be auto, edit or t2i, got '{task}'")
        self.task = task
        self.sc_template = sc_template
        self.pq_template = pq_template or templates.VIESCORE_PQ
        templates.check_template(self.pq_template, set(), f"reward '{self.name}' args.pq_template")
        if sc_template is not None:
            templates.check_template(sc_template, {"prompt", "instruction"}, f"reward '{self.name}' args.sc_template")

    async def _judge(self, inp: RewardInput, uris: list[str], call: _Call) -> JudgeScores:
        edit = self.task == "edit" or (self.task == "auto" and inp.source_images is not None)
        src = await asyncio.to_thread(self._source_uris, inp) if edit else None
        sc_t = self.sc_template or (templates.VIESCORE_SC_EDIT if edit else templates.VIESCORE_SC_T2I)
        n_sc = 2 if edit else 1
        sc_out = [NAN] * len(inp)
        pq_out = [NAN] * len(inp)

        async def sc(i: int) -> list[float] | None:
            text = sc_t.format(prompt=inp.prompts[i], instruction=_instruction(inp, i))
            res = await self._ask(call, text, [src[i], uris[i]] if src else [uris[i]])
            return None if res is None else self._parsed(call, parsers.parse_score_list(res.text, expected_len=n_sc))

        async def pq(i: int) -> list[float] | None:
            # (a template with no placeholders still goes through format(): its literal braces are written {{ }})
            res = await self._ask(call, self.pq_template.format(), [uris[i]])
            return None if res is None else self._parsed(call, parsers.parse_score_list(res.text, expected_len=2))

        async def one(i: int) -> float:
            s, p = await asyncio.gather(sc(i), pq(i))
            if s is not None:
                sc_out[i] = min(s)
            if p is not None:
                pq_out[i] = min(p)
            if s is None or p is None:
                return NAN
            return math.sqrt(min(s) * min(p)) / 10.0

        scores = await asyncio.gather(*(one(i) for i in range(len(inp))))
        return JudgeScores(list(scores), parts={"sc": sc_out, "pq": pq_out})


class PairwiseJudge(JudgeReward):
    """``pairwise_judge``: each sample's win rate against the other samples of its group.

    For every pair i < j of a group (``RewardInput.group_ids``) the judge sees Image A and Image B and
    picks one (or a tie, worth half a win to each). With ``swap: true`` (default) every pair is also
    asked in the other order and both answers count, which cancels a constant position bias.
    score_i = wins_i / parsed comparisons_i, in [0, 1]. A sample whose comparisons all failed, or that is
    alone in its group, abstains. Requests per group of size G: G(G-1)/2, doubled with swap.
    ``details``: ``comparisons`` per sample; ``order_checked`` (pairs answered in both orders) and
    ``order_agreed`` (of those, how many named the same winner both times; a low ratio means the judge
    mostly follows position).
    """

    default_max_tokens = 16

    def __init__(self, *, backend: dict[str, Any] | JudgeBackend, name: str = "", template: str = templates.PAIRWISE,
                 swap: bool = True, **kw: Any) -> None:
        super().__init__(backend=backend, name=name, **kw)
        templates.check_template(template, {"prompt"}, f"reward '{self.name}' args.template")
        self.template = template
        self.swap = bool(swap)

    async def _judge(self, inp: RewardInput, uris: list[str], call: _Call) -> JudgeScores:
        if inp.group_ids is None:
            raise ValueError(
                f"reward '{self.name}' (pairwise_judge) needs RewardInput.group_ids: samples of one prompt share an id"
            )
        n = len(inp)
        gids = [int(g) for g in inp.group_ids.reshape(-1).tolist()]
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(gids):
            groups.setdefault(g, []).append(i)
        wins = [0.0] * n
        comps = [0] * n

        async def ask(a: int, b: int) -> str | None:
            res = await self._ask(call, self.template.format(prompt=inp.prompts[a]), [uris[a], uris[b]],
                                  labels=["Image A:", "Image B:"])
            return None if res is None else self._parsed(call, parsers.parse_choice(res.text))

        async def pair(i: int, j: int) -> tuple[str | None, str | None]:
            fwd = ask(i, j)
            if not self.swap:
                return await fwd, None
            a, b = await asyncio.gather(fwd, ask(j, i))
            return a, b

        pairs = [(i, j) for members in groups.values() for i, j in itertools.combinations(members, 2)]
        results = await asyncio.gather(*(pair(i, j) for i, j in pairs))
        agree = both = 0
        for (i, j), (fwd, rev) in zip(pairs, results):
            # Map each answer to the winner's sample index: in the reversed order, A is j.
            for choice, first, second in ((fwd, i, j), (rev, j, i)):
                if choice is None:
                    continue
                comps[i] += 1
                comps[j] += 1
                if choice == "A":
                    wins[first] += 1.0
                elif choice == "B":
                    wins[second] += 1.0
                else:
                    wins[i] += 0.5
                    wins[j] += 0.5
            if fwd is not None and rev is not None:
                both += 1
                flip = {"A": "B", "B": "A", "tie": "tie"}
                agree += int(fwd == flip[rev])
        scores = [wins[k] / comps[k] if comps[k] > 0 else NAN for k in range(n)]
        # counts, not rates: the trainer adds scalar details up over the micro-batches of a step
        counters: dict[str, float] = {"pairs": len(pairs), "order_checked": both, "order_agreed": agree}
        return JudgeScores(scores, parts={"comparisons": [float(c) for c in comps]}, counters=counters)


class RubricJudge(JudgeReward):
    """``rubric_judge``: weighted mean of rubric dimensions, each rated 0-10, divided by 10.

    Args: ``dimensions``: a list of names (equal weights) or ``{name: weight}`` (weights > 0); default: five
    editing-consistency dimensions (`templates.RUBRIC_DIMENSIONS`, our choice). ``descriptions``:
    ``{name: what it means}`` shown to the judge (defaults exist for the default names). ``min_dimensions``:
    how many dimensions must be parsed for a score (default: all); with fewer the sample abstains, with
    enough the weighted mean runs over the dimensions found. ``use_source``: show
    ``RewardInput.source_images`` first when present (default true). ``template``: placeholders
    ``{prompt}``, ``{dimensions}``, ``{example}``, ``{image_roles}``.
    """

    default_max_tokens = 256

    def __init__(self, *, backend: dict[str, Any] | JudgeBackend, name: str = "",
                 dimensions: list[str] | dict[str, float] | None = None, descriptions: dict[str, str] | None = None,
                 min_dimensions: int | None = None, use_source: bool = True, template: str = templates.RUBRIC,
                 **kw: Any) -> None:
        super().__init__(backend=backend, name=name, **kw)
        if dimensions is None:
            dimensions = list(templates.RUBRIC_DIMENSIONS)
        if isinstance(dimensions, dict):
            self.weights = {str(k): float(v) for k, v in dimensions.items()}
        else:
            self.weights = {str(k): 1.0 for k in dimensions}
        if not self.weights:
            raise ValueError(f"reward '{self.name}': args.dimensions is empty; list at least one dimension")
        bad = [k for k, w in self.weights.items() if not (w > 0 and math.isfinite(w))]
        if bad:
            raise ValueError(f"reward '{self.name}': args.dimensions weight of '{bad[0]}' must be a positive number")
        self.descriptions = {**templates.RUBRIC_DIMENSIONS, **(descriptions or {})}
        k = len(self.weights)
        self.min_dimensions = k if min_dimensions is None else int(min_dimensions)
        if not 1 <= self.min_dimensions <= k:
            raise ValueError(f"reward '{self.name}': args.min_dimensions must be in 1..{k} (number of dimensions), got {min_dimensions}")
        self.use_source = bool(use_source)
        templates.check_template(template, {"prompt", "dimensions", "example", "image_roles"}, f"reward '{self.name}' args.template")
        self.template = template

    def rubric_text(self) -> tuple[str, str]:
        lines = []
        for d in self.weights:
            desc = self.descriptions.get(d)
            lines.append(f"- {d}: {desc}" if desc else f"- {d}")
        example = "{" + ", ".join(f'"{d}": <0-10>' for d in self.weights) + "}"
        return "\n".join(lines), example

    def combine(self, found: dict[str, float]) -> float:
        """Weighted mean over the dimensions found, /10; NaN when fewer than `min_dimensions` were found."""
        if len(found) < self.min_dimensions:
            return NAN
        w = sum(self.weights[d] for d in found)
        return sum(self.weights[d] * s for d, s in found.items()) / w / 10.0

    async def _judge(self, inp: RewardInput, uris: list[str], call: _Call) -> JudgeScores:
        with_src = self.use_source and inp.source_images is not None
        src = await asyncio.to_thread(self._source_uris, inp) if with_src else None
        roles = "the original image, then the edited result" if with_src else "the generated image"
        dims_text, example = self.rubric_text()
        parts = {d: [NAN] * len(inp) for d in self.weights}
        incomplete = 0

        async def one(i: int) -> float:
            nonlocal incomplete
            text = self.template.format(prompt=_instruction(inp, i), dimensions=dims_text, example=example, image_roles=roles)
            res = await self._ask(call, text, [src[i], uris[i]] if src else [uris[i]])
            if res is None:
                return NAN
            found = self._parsed(call, parsers.parse_rubric(res.text, list(self.weights)))
            for d, s in found.items():
                parts[d][i] = s
            if found and len(found) < self.min_dimensions:
                incomplete += 1  # read something, but too little: a parse failure, also counted on its own
                call.parse_failures += 1
            return self.combine(found)

        scores = await asyncio.gather(*(one(i) for i in range(len(inp))))
        return JudgeScores(list(scores), parts=parts, counters={"incomplete_parses": incomplete})


class EditJudge(JudgeReward):
    """``edit_judge``: "does the edit follow the instruction" and "is the rest preserved", combined.

    Args: ``mode``: ``score`` (each question answered 0-10, divided by 10; default) or ``yes_no`` (each
    question's P(yes) from log-probs, text fallback); ``combine``: ``mean`` (default), ``min`` or
    ``product`` of the two values in [0, 1]; ``follow_template`` / ``preserve_template`` (placeholder
    ``{instruction}``). Needs ``RewardInput.source_images``. If either question fails, the sample abstains.
    ``details``: per-sample ``follow`` and ``preserve`` in [0, 1].
    """

    default_max_tokens = 16

    def __init__(self, *, backend: dict[str, Any] | JudgeBackend, name: str = "", mode: str = "score",
                 combine: str = "mean", follow_template: str | None = None, preserve_template: str | None = None,
                 top_logprobs: int = 20, **kw: Any) -> None:
        super().__init__(backend=backend, name=name, **kw)
        if mode not in ("score", "yes_no"):
            raise ValueError(f"reward '{self.name}': args.mode must be score or yes_no, got '{mode}'")
        if combine not in ("mean", "min", "product"):
            raise ValueError(f"reward '{self.name}': args.combine must be mean, min or product, got '{combine}'")
        self.mode, self.combine_mode, self.top_logprobs = mode, combine, int(top_logprobs)
        yn = mode == "yes_no"
        self.follow_template = follow_template or (templates.EDIT_FOLLOW_YES_NO if yn else templates.EDIT_FOLLOW_SCORE)
        self.preserve_template = preserve_template or (templates.EDIT_PRESERVE_YES_NO if yn else templates.EDIT_PRESERVE_SCORE)
        for f, t in (("follow_template", self.follow_template), ("preserve_template", self.preserve_template)):
            templates.check_template(t, {"instruction"}, f"reward '{self.name}' args.{f}")

    def combine(self, follow: float, preserve: float) -> float:
        if self.combine_mode == "mean":
            return 0.5 * (follow + preserve)
        if self.combine_mode == "min":
            return min(follow, preserve)
        return follow * preserve

    async def _judge(self, inp: RewardInput, uris: list[str], call: _Call) -> JudgeScores:
        src = await asyncio.to_thread(self._source_uris, inp)
        follow = [NAN] * len(inp)
        preserve = [NAN] * len(inp)

        async def question(template: str, i: int) -> float | None:
            text = template.format(instruction=_instruction(inp, i))
            if self.mode == "yes_no":
                res = await self._ask(call, text, [src[i], uris[i]], top_logprobs=self.top_logprobs)
                return None if res is None else self._parsed(call, parsers.yes_no_probability(res.top_logprobs, res.text).p_yes)
            res = await self._ask(call, text, [src[i], uris[i]])
            if res is None:
                return None
            s = self._parsed(call, parsers.parse_score(res.text))
            return None if s is None else s / 10.0

        async def one(i: int) -> float:
            f, p = await asyncio.gather(question(self.follow_template, i), question(self.preserve_template, i))
            if f is not None:
                follow[i] = f
            if p is not None:
                preserve[i] = p
            return NAN if f is None or p is None else self.combine(f, p)

        scores = await asyncio.gather(*(one(i) for i in range(len(inp))))
        return JudgeScores(list(scores), parts={"follow": follow, "preserve": preserve})
