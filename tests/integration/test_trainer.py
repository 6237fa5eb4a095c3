"""The one training loop end to end on tiny real architectures: resume equality, every parameter trains,
abstain handling, multi-process equals single-process."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imagerl.config import ConfigError, load_config
from imagerl.policies.flow.sd3 import SD3Policy
from imagerl.recipes.grpo import GRPOTrainer, TrainingError
from imagerl.rewards.base import Reward
from imagerl.rewards.rule import ColorPositionReward
from imagerl.types import RewardOutput

FAMILY_OVERRIDES = {
    "janus": ["model.family=janus", "model.tiny_size=test"],
    "sd3": ["model.family=sd3", "model.tiny_size=test", "rollout.num_steps=3", "rollout.cfg_scale=1.0"],
    "flux": ["model.family=flux", "model.tiny_size=test", "rollout.num_steps=3", "rollout.cfg_scale=1.0"],
    "qwen_image": ["model.family=qwen_image", "model.tiny_size=test", "rollout.num_steps=3", "rollout.cfg_scale=1.0"],
}
COMMON = ["logging.progress_bar=false", "logging.sample_every=0", "data.prompts_per_step=2", "rollout.group_size=4",
          "algorithm.micro_batch_size=3", "optim.lr=1e-3", "logging.console=false"]


def cfg_for(family, out, *extra):
    return load_config(None, FAMILY_OVERRIDES[family] + COMMON + [f"run.output_dir={out}", *extra])


def metrics(path):
    rows = [json.loads(line) for line in Path(path, "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.parametrize("family,extra", [("janus", []), ("sd3", []),
                                          ("janus", ["optim.ema_decay=0.9", "train.eval_every=2", "optim.lr=1e-2"])])
def test_resume_reproduces_uninterrupted_run(tmp_path, family, extra):
    # with an EMA, the step-4 evaluation runs on the average, which must come back from the checkpoint
    GRPOTrainer(cfg_for(family, tmp_path / "a", "train.steps=4", "checkpoint.every=2", *extra)).train()
    # Interrupted run: stop after step 2 (the checkpoint), then the same command with steps=4 resumes.
    GRPOTrainer(cfg_for(family, tmp_path / "b", "train.steps=2", "checkpoint.every=2", *extra)).train()
    t = GRPOTrainer(cfg_for(family, tmp_path / "b", "train.steps=4", "checkpoint.every=2", *extra))
    assert t.start_step == 2
    t.train()
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b  # bit-identical numbers, CPU fp32
    if extra:
        assert "eval/reward/mean" in b[3] and (tmp_path / "b" / "checkpoints" / "step_000004" / "ema").is_dir()


def test_resume_takes_the_learning_rate_and_schedule_from_the_current_config(tmp_path):
    # a finished 2-step cosine run (its rate has decayed), resumed with a doubled lr and 4 steps: steps 3 and 4 use
    # 2e-3 * 0.5 * (1 + cos(pi * s / 4)) for s = 2, 3, not the checkpoint's rate
    run = ["optim.schedule=cosine", "optim.warmup_steps=0", "checkpoint.every=2"]
    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", *run)).train()
    t = GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=4", "optim.lr=2e-3", "optim.weight_decay=0.1", *run))
    assert t.optimizer.param_groups[0]["weight_decay"] == 0.1
    t.train()
    lrs = [r["lr"] for r in metrics(tmp_path)]
    assert lrs == pytest.approx([1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 2)), 1e-3, 1e-3 * (1 + math.cos(3 * math.pi / 4))])


def test_resume_with_other_epochs_keeps_the_schedule_and_says_when_draws_change(tmp_path):
    # 2 steps of 2 inner epochs each (4 optimizer steps), resumed with 1 epoch and 4 steps: steps 3 and 4 are at
    # training steps 2 and 3 of the cosine (the optimizer-step count, 4, read as 4 training steps put both at 0)
    run = ["optim.schedule=cosine", "optim.warmup_steps=0", "checkpoint.every=1"]
    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "algorithm.inner_epochs=2", *run)).train()
    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=4", "algorithm.inner_epochs=1", *run)).train()
    lrs = [r["lr"] for r in metrics(tmp_path)]
    assert lrs[2:] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in (2, 3)])
    # another seed or other prompt files resume, with a note (the config.yaml no longer reproduces the run) ...
    t = GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=5", "run.seed=7", *run))
    assert t._resume_note.endswith("step_000004, written with run.seed=0 (now 7): the steps from here on draw "
                                   "differently from the run that wrote it")
    t.close()
    # ... but another number of prompt files cannot continue the sampler's position: the error says what to do
    with pytest.raises(TrainingError, match=r"step_000004: sampler state in the checkpoint was written for a different "
                                            r"number of datasets \(2 now\): resume with the data.datasets that wrote it"):
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=5", *run,
                            "data.datasets=[{path: 'builtin:colors'}, {path: 'builtin:color_shapes'}]"))


def test_ema_start_follows_the_steps_per_training_step_on_resume(tmp_path):
    # EMA switched on after step 1 of a 2-epoch run starts at optimizer step 2; resumed with 1 epoch per step, the
    # schedule position is 2 training steps = 2 optimizer steps, and the EMA's start is training step 1 = 1 (kept at 2
    # it would not advance: the average stood still until the count caught up)
    run = ["checkpoint.every=1"]
    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=1", "algorithm.inner_epochs=2", *run)).train()
    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "algorithm.inner_epochs=2", "optim.ema_decay=0.5", *run)).train()
    t = GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=3", "algorithm.inner_epochs=1", "optim.ema_decay=0.5", *run))
    assert t.ema.start == 1 and t.scheduler.last_epoch == 2
    t.close()


def test_ema_switched_on_mid_run_starts_from_the_resumed_weights(tmp_path, capsys):
    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=1", "checkpoint.every=1")).train()
    t = GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "optim.ema_decay=0.9", "checkpoint.every=1"))
    assert "holds no EMA" in capsys.readouterr().out
    assert all(torch.equal(t.ema.state_dict()[n], p) for n, p in t.policy.named_trainable_parameters())
    # its warm-up starts with it (at the 2 optimizer steps the checkpoint had taken): the first update after the
    # switch has decay 0.1, as a fresh EMA's first, not the decay a run 2 updates in would use
    assert t.ema.start == 2
    from imagerl.ema import WeightEMA

    w = torch.nn.Parameter(torch.zeros(1))
    late = WeightEMA([("w", w)], 0.9, 1, start=2)
    with torch.no_grad():
        w.fill_(1.0)
    late.update(3)
    assert late.state_dict()["w"].item() == pytest.approx(0.9)  # decay 0.1: 0.1 * 0 + 0.9 * 1
    t.train()
    # and the start is kept by the next checkpoint, so a later resume warms up the same way
    t2 = GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=3", "optim.ema_decay=0.9", "checkpoint.every=1"))
    assert t2.ema.start == 2
    t2.close()
    # a damaged ema/ (its metadata gone) is an error naming the checkpoint, not a silent restart of the average
    (tmp_path / "checkpoints" / "step_000002" / "ema" / ".metadata").unlink()
    with pytest.raises(TrainingError, match=r"step_000002/ema is incomplete \(a damaged checkpoint\): remove"):
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=3", "optim.ema_decay=0.9"))


def test_ema_weights_are_evaluated_sampled_and_exported(tmp_path):
    from imagerl.cli import main

    args = ["optim.ema_decay=0.9", "optim.lr=1e-2", "train.steps=3", "checkpoint.every=0"]
    t = GRPOTrainer(cfg_for("janus", tmp_path, *args))
    t.train()
    named = t.policy.named_trainable_parameters()
    trained = {n: p.detach().clone() for n, p in named}
    ema = t.ema.state_dict()
    assert all(not torch.equal(ema[n], trained[n]) for n in trained)  # the average lags the trained weights
    with t.eval_weights():
        assert all(torch.equal(p, ema[n]) for n, p in named)
    assert all(torch.equal(p, trained[n]) for n, p in named)  # and they come back exactly
    # `imagerl export` writes the average (a fresh process-like load: weights + EMA from the checkpoint), by default
    # into a folder named like eval's and sample's outputs (the --no-ema export below does not overwrite it)
    assert main(["export", f"run.output_dir={tmp_path}"]) == 0
    (tmp_path / "export" / "step_000003").rename(tmp_path / "exp")
    from safetensors.torch import load_file

    def weights(d):
        return {k: v for f in (tmp_path / d).glob("*.safetensors") for k, v in load_file(f).items()}

    exported = weights("exp")
    n = "language_model.layers.0.self_attn.q_proj.weight"  # (the trained module is JanusModel, exported as model.*)
    assert torch.equal(exported["model." + n], ema[n]) and not torch.equal(exported["model." + n], trained[n])
    # --no-ema: the trained weights
    assert main(["export", f"run.output_dir={tmp_path}", "--no-ema"]) == 0
    raw = weights("export/step_000003_no_ema")
    assert torch.equal(raw["model." + n], trained[n])
    # eval of the average and of the trained weights, side by side
    assert main(["eval", f"run.output_dir={tmp_path}"]) == 0 and main(["eval", f"run.output_dir={tmp_path}", "--no-ema"]) == 0
    assert (tmp_path / "eval" / "step_000003.json").exists() and (tmp_path / "eval" / "step_000003_no_ema.json").exists()


@pytest.mark.parametrize("family", ["janus", "sd3"])
@pytest.mark.parametrize("lora", [False, True])
def test_every_trainable_parameter_changes(tmp_path, family, lora):
    # LoRA's B starts at zero, so A gets no gradient in the first step: with LoRA train two steps.
    steps = 2 if lora else 1
    t = GRPOTrainer(cfg_for(family, tmp_path, f"train.steps={steps}", f"model.lora.enabled={str(lora).lower()}", "model.lora.r=4",
                            "checkpoint.every=0", "checkpoint.save_final=false", "optim.lr=1e-2"))
    before = {n: p.detach().clone() for n, p in t.policy.named_trainable_parameters()}
    assert before, "no trainable parameters"
    if lora:
        assert all("lora" in n for n in before)
    t.train()
    after = dict(t.policy.named_trainable_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"
    m = metrics(tmp_path)[0]
    assert m["ratio/first_epoch_max_dev"] < 1e-5  # first inner step: recomputed log-probs equal the rollout's


def test_all_abstain_is_a_clear_error(tmp_path):
    # color_position abstains on prompts without a colour: nothing to learn from, so the step fails loudly.
    (tmp_path / "p.txt").write_text("a photo of a cat\na dog\n")
    t = GRPOTrainer(cfg_for("janus", tmp_path / "o", "train.steps=1", f"data.datasets.0.path={tmp_path}/p.txt"))
    with pytest.raises(TrainingError, match=r"no reward.*color_position.*scoring.fallback"):
        t.train()
    # half of the prompts name a colour: the step trains on those, and the abstains are logged as fractions
    (tmp_path / "half.txt").write_text("a photo of a cat\na red square on the left\n")
    GRPOTrainer(cfg_for("janus", tmp_path / "h", "train.steps=1", f"data.datasets.0.path={tmp_path}/half.txt")).train()
    m = metrics(tmp_path / "h")[0]
    assert m["reward/abstain"] == m["reward/color_position/abstain"] == 0.5
    assert 0 <= m["reward/mean"] <= 1 and m["grad_norm"] > 0


@pytest.mark.parametrize("strategy", ["none", pytest.param("deepspeed", marks=pytest.mark.dist)])
def test_non_finite_gradient_is_a_clear_error(tmp_path, strategy):
    # A learning rate of 1e30 blows the weights up after the first update: the next gradient norm is NaN/inf,
    # and the run must stop with an error that names the fix, not keep training on garbage (DeepSpeed skips
    # such an update itself; the loop still has to stop).
    args = ["train", *FAMILY_OVERRIDES["janus"], *COMMON, "optim.lr=1e30", "optim.grad_clip=0", "train.steps=3",
            "checkpoint.every=0", "run.threads=1", f"dist.strategy={strategy}", f"run.output_dir={tmp_path}"]
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29591"]
    else:
        launch = [sys.executable]
    p = subprocess.run([*launch, "-m", "imagerl.cli", *args], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    assert "gradient norm is" in p.stderr and "lower optim.lr" in p.stderr, p.stderr[-2000:]


@pytest.mark.dist
def test_prompts_not_divisible_by_processes_fail_at_start(tmp_path):
    # every rank refuses before loading the model (the check used to run inside the first step)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29589",
                        "-m", "imagerl.cli", "train", *FAMILY_OVERRIDES["janus"], *COMMON, "data.prompts_per_step=3",
                        f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    assert "data.prompts_per_step=3 must be divisible by the number of processes (2)" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "config.yaml").exists()
    # a config or data error is the same on every rank: said once per node (by local rank 0), not once per process
    for bad, said in (("train.stepz=3", "imagerl: config error: unknown config key 'train.stepz'"),
                      (f"data.datasets.0.path={tmp_path}/none.txt", "imagerl: DataError: data.datasets[0].path")):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29589",
                            "-m", "imagerl.cli", "train", *FAMILY_OVERRIDES["janus"], *COMMON, bad,
                            f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode != 0 and p.stderr.count(said) == 1, p.stderr[-2000:]


def test_unreadable_optimizer_state_is_a_clear_error(tmp_path):
    # resuming must not crash deep inside torch.distributed.checkpoint: a damaged checkpoint (its optimizer/
    # directory gone) and an unknown layout each name the checkpoint and what to do
    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=1", "checkpoint.every=1")).train()
    ck = tmp_path / "checkpoints" / "step_000001"
    from imagerl.checkpoint import CheckpointError

    # a truncated shard (its metadata intact): DCP raises a BaseException, which no `except Exception` caught
    shard = next((ck / "optimizer").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"step_000001/optimizer cannot be read \(CheckpointException.*remove"):
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2"))
    shutil.rmtree(ck / "optimizer")
    with pytest.raises(TrainingError, match=r"step_000001/optimizer is missing or incomplete.*remove .*step_000001"):
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2"))
    state = torch.load(ck / "optimizer.pt", weights_only=False)
    torch.save({**state, "optimizer": {"state": {}, "param_groups": []}}, ck / "optimizer.pt")  # a bare AdamW state
    with pytest.raises(TrainingError, match=r"no optimizer state this version can read"):
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2"))
    # a truncated weights file or a garbled state.json: the file, the reader's complaint, and the way out
    (ck / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"step_000001/state.json cannot be read \(JSONDecodeError.*remove .*step_000001"):
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2"))
    for odd in ("[]", '{"step": "one", "sampler": {}}', '{"step": 1}'):  # JSON, but not the state (was: raw tracebacks)
        (ck / "state.json").write_text(odd)
        with pytest.raises(CheckpointError, match=r"state.json cannot be read \(ValueError: not a checkpoint state"):
            GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2"))
    w = ck / "trainable.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"trainable.safetensors cannot be read \(SafetensorError.*damaged"):
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2"))


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(TrainingError, match=r"^run.output_dir=.*a_file/run: cannot write there \(.*\); give a writable"):
        GRPOTrainer(cfg_for("janus", tmp_path / "a_file" / "run"))


@pytest.mark.parametrize("override,match", [
    ("algorithm.advantage=group_zscor", r"^algorithm.advantage: unknown advantage estimator 'group_zscor'\. "
                                        r"Did you mean 'group_zscore'\?"),
    ("model.family=januss", r"^model.family: unknown policy 'januss'\. Did you mean 'janus'\?"),
    # a class of the user's that is no policy (a reward, say): one line at start, not an AttributeError later
    ("model.family=imagerl.rewards.rule:BrightnessReward", r"^model.family=imagerl.rewards.rule:BrightnessReward: "
                                                           r"'BrightnessReward' is not a policy: .* must subclass "
                                                           r"imagerl.policies.base.Policy"),
    ("run.device=gpu", r"^run.device='gpu' is not a device: use auto, cpu, cuda, cuda:N or mps"),
])
def test_bad_names_fail_before_anything_runs_or_is_written(tmp_path, override, match):
    # checked when the trainer starts, not where first used (the advantage estimator: after a whole rollout)
    with pytest.raises((KeyError, ValueError), match=match):
        GRPOTrainer(cfg_for("janus", tmp_path / "run", override))
    assert not (tmp_path / "run").exists()
    # the command exits with it as one line (SystemExit with the message; anything else would be a traceback)
    from imagerl.cli import main

    with pytest.raises(SystemExit, match=r"^imagerl: (RegistryError|ValueError): " + match.lstrip("^")):
        main(["train", *FAMILY_OVERRIDES["janus"], *COMMON, f"run.output_dir={tmp_path}/run", override])


def test_eval_and_sft_files_are_read_at_start(tmp_path, monkeypatch):
    # not at the first evaluation (train.eval_every steps in) or the first SFT term
    from imagerl.data.prompts import DataError

    monkeypatch.setattr(GRPOTrainer, "step", lambda *a, **k: pytest.fail("a step ran before the data was checked"))
    with pytest.raises(DataError, match=r"^data.eval_datasets\[0\].path: prompt file '.*nope.txt' does not exist"):
        GRPOTrainer(cfg_for("janus", tmp_path / "a", f"data.eval_datasets=[{{path: {tmp_path}/nope.txt}}]",
                            "train.eval_every=50"))
    with pytest.raises(DataError, match=r"^data.sft_datasets\[\].path: prompt file '.*nope.jsonl' does not exist"):
        GRPOTrainer(cfg_for("janus", tmp_path / "b", f"data.sft_datasets=[{{path: {tmp_path}/nope.jsonl}}]",
                            "algorithm.sft_weight=0.1"))
    # a refused start leaves no run folder it created (only its lock was in it), and one that existed stays
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError):
        GRPOTrainer(cfg_for("janus", tmp_path / "c", f"data.eval_datasets=[{{path: {tmp_path}/nope.txt}}]"))
    assert (tmp_path / "c").is_dir()
    GRPOTrainer(cfg_for("janus", tmp_path / "a")).close()  # (and the directory can be used right away)


def test_a_start_that_fails_after_the_logger_opened_closes_its_backends(tmp_path, monkeypatch):
    # (the last thing a start does is ask the policy what it ignores: a plugin policy may raise there)
    from imagerl.logging import _TensorBoard
    from imagerl.policies.ar.janus import JanusPolicy

    closed = []
    monkeypatch.setattr(_TensorBoard, "_close", lambda self: closed.append(self.writer.close()))
    monkeypatch.setattr(JanusPolicy, "unused_changes", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        GRPOTrainer(cfg_for("janus", tmp_path, "logging.tensorboard=true"))
    assert closed == [None]  # its TensorBoard writer was closed (as W&B / SwanLab runs are finished) ...
    assert not (tmp_path / "reward_curve.png").exists()  # ... without drawing a curve of a run that never ran


def test_reward_weight_mistakes_fail_at_start(tmp_path):
    # a per-dataset weight for a reward name that does not exist would be ignored; all-zero weights train nothing
    with pytest.raises(TrainingError, match=r"^data.datasets\[0\].reward_weights: no reward is named 'colour_position'\. "
                                            r"Did you mean 'color_position'\? The rewards are: color_position"):
        GRPOTrainer(cfg_for("janus", tmp_path / "a", "data.datasets.0.reward_weights.colour_position=2"))
    with pytest.raises(TrainingError, match=r"^every reward has weight 0 \(rewards\[\].weight\)"):
        GRPOTrainer(cfg_for("janus", tmp_path / "b", "rewards.0.weight=0"))
    # a zero global weight with a dataset that weights it is fine
    GRPOTrainer(cfg_for("janus", tmp_path / "c", "rewards.0.weight=0",
                        "data.datasets.0.reward_weights.color_position=1")).close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where torch has no GPU")
def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"^run.device='cuda:1': (this torch is built without CUDA|no GPU is visible); "
                                         r"use run.device=auto \(CPU here\) or run.device=cpu"):
        GRPOTrainer(cfg_for("janus", tmp_path, "run.device=cuda:1"))


def test_start_banner_says_what_trains_on_what(tmp_path, capsys):
    t = GRPOTrainer(cfg_for("janus", tmp_path, "logging.console=true", "model.lora.enabled=true", "model.lora.r=4",
                            "train.steps=3"))
    n = sum(p.numel() for p in t.params)
    t.close()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("janus "))
    size = f"{n / 1e3:.1f}K" if n < 1e6 else f"{n / 1e6:.1f}M"
    assert line == (f"janus (tiny test): {size} trained parameters, LoRA r=4 | data: colors (8 prompts) | rewards: "
                    f"color_position x1 | 2 prompts x 4 samples per step, steps 1..3 -> {tmp_path}")


def test_settings_of_other_families_are_noted_and_kl_estimators_checked(tmp_path, capsys):
    # one YAML may carry AR and flow settings: those the family never reads get a note, not silence
    GRPOTrainer(cfg_for("janus", tmp_path / "a", "logging.console=true", "algorithm.timestep_fraction=0.5",
                        "rollout.top_k=5")).close()
    out = capsys.readouterr().out
    assert "note: model.family=janus does not use algorithm.timestep_fraction=0.5 (left as set" in out
    assert "top_k" not in out  # (janus reads it)
    GRPOTrainer(cfg_for("sd3", tmp_path / "b", "logging.console=true", "rollout.top_k=5")).close()
    assert "note: model.family=sd3 does not use rollout.top_k=5 (" in capsys.readouterr().out
    GRPOTrainer(cfg_for("sd3", tmp_path / "c", "logging.console=true")).close()
    assert "note:" not in capsys.readouterr().out
    # rollout.cuda_graph defaults to null (auto): false, what config.yaml files written before held, is no setting of
    # the user's, while true is
    GRPOTrainer(cfg_for("sd3", tmp_path / "e", "logging.console=true", "rollout.cuda_graph=false")).close()
    assert "note:" not in capsys.readouterr().out
    GRPOTrainer(cfg_for("sd3", tmp_path / "f", "logging.console=true", "rollout.cuda_graph=true")).close()
    assert "note: model.family=sd3 does not use rollout.cuda_graph=True (" in capsys.readouterr().out
    GRPOTrainer(cfg_for("sd3", tmp_path / "d", "logging.console=true", "model.lora.enabled=true",
                        "model.lora.dropout=0.1")).close()
    assert "note: model.lora.dropout=0.1 has no effect: the policy runs in eval mode" in capsys.readouterr().out
    # a KL estimator the family has no outputs for fails at start (it used to fail at the first KL term)
    with pytest.raises(ValueError, match=r"^algorithm.kl_estimator=mean does not apply to model.family=janus .*"
                                         r"use one of k1, k2, k3$"):
        GRPOTrainer(cfg_for("janus", tmp_path / "d", "algorithm.kl_estimator=mean", "algorithm.kl_coef=0.1"))
    GRPOTrainer(cfg_for("sd3", tmp_path / "e", "algorithm.kl_estimator=mean", "algorithm.kl_coef=0.1")).close()
    # k3 of a flow step's log-prob (a mean over the latent elements) is no KL estimate: refused, saying why
    with pytest.raises(ValueError, match=r"^algorithm.kl_estimator=k3 does not apply to model.family=sd3 \(a flow "
                                         r"transition's log-density is averaged .*use one of mean, mean_dt, velocity, velocity_var$"):
        GRPOTrainer(cfg_for("sd3", tmp_path / "g", "algorithm.kl_estimator=k3", "algorithm.kl_coef=0.1"))
    # the default, auto, is each family's estimator (and the run's config.yaml records which)
    for family, want in (("sd3", "mean"), ("janus", "k3")):
        t = GRPOTrainer(cfg_for(family, tmp_path / f"auto_{family}", "algorithm.kl_coef=0.1"))
        t.close()
        assert t.cfg.algorithm.kl_estimator == want
        assert load_config(str(tmp_path / f"auto_{family}" / "config.yaml")).algorithm.kl_estimator == want
    # settings that used to fail only after the first rollout: no SFT loss (janus), a KL without a reference
    for args, msg in [(("algorithm.sft_weight=0.5", "data.sft_datasets.0.path=builtin:color_shapes"),
                       r"^algorithm.sft_weight=0.5: model.family=janus has no auxiliary SFT loss"),
                      (("model.reference=none", "algorithm.kl_coef=0.04"), r"^algorithm.kl_coef=0.04 needs a reference"),
                      (("model.reference=lora_disabled", "model.lora.enabled=false", "algorithm.kl_coef=0.04"),
                       r"^model.reference=lora_disabled needs model.lora.enabled=true")]:
        with pytest.raises(ValueError, match=msg):
            GRPOTrainer(cfg_for("janus", tmp_path / "f", *args))


@pytest.mark.parametrize("steps,every,saved", [(4, 2, [2, 4]), (3, 2, [2, 3]), (2, 0, [2])])
def test_each_step_is_checkpointed_once(tmp_path, monkeypatch, steps, every, saved):
    # the final save is skipped when the periodic one just wrote the last step (it rewrote all the weights)
    calls = []
    real_save = GRPOTrainer.save
    monkeypatch.setattr(GRPOTrainer, "save", lambda self, step: calls.append(step) or real_save(self, step))
    GRPOTrainer(cfg_for("janus", tmp_path, f"train.steps={steps}", f"checkpoint.every={every}")).train()
    assert calls == saved
    assert (tmp_path / "checkpoints" / f"step_{steps:06d}").is_dir()


def test_finished_run_and_resume_false_on_an_existing_run(tmp_path, capsys):
    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "checkpoint.every=1")).train()
    before = (tmp_path / "metrics.jsonl").read_text()
    # rerunning a finished run says so instead of a silent "Done"
    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "logging.console=true")).close()
    assert "nothing to train: the run is at step 2 and train.steps=2; raise train.steps" in capsys.readouterr().out
    # starting anew in the same directory would truncate its metrics and mix its checkpoints with the new run's
    with pytest.raises(TrainingError, match=r"already holds a run \(checkpoints up to step_000002\) and run.resume=false "
                                            r"would overwrite it: give a new run.output_dir"):
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "run.resume=false"))
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    GRPOTrainer(cfg_for("janus", tmp_path / "new", "train.steps=1", "run.resume=false")).train()  # a new dir is fine


def test_resume_with_other_model_settings_names_what_changed(tmp_path, monkeypatch):
    # the same run.output_dir with another LoRA setting or model size: not a bare tensor error, but the
    # checkpoint, what does not fit, and the model.* settings that differ from the ones that wrote it
    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=1", "checkpoint.every=1")).train()
    with pytest.raises(TrainingError, match=r"step_000001: checkpoint does not match the policy: missing .*lora_A.*"
                                            r"It was written with model.lora.enabled=False \(now True\)\. Resume with"):
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "model.lora.enabled=true"))
    with pytest.raises(TrainingError, match=r"other shapes than the policy's .*q_proj.weight \(32, 32\) vs \(16, 16\).*"
                                            r"written with model.tiny_overrides.hidden_size=unset \(now 16\)\."):
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "model.tiny_overrides.hidden_size=16"))
    # a logging backend that cannot start (not installed here, or W&B online without a login): refused as well
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    from imagerl.policies.ar.janus import JanusPolicy

    def loaded(*a, **kw):
        raise AssertionError("the policy loaded before the logging backends were checked")

    with monkeypatch.context() as m, pytest.raises(ConfigError, match=r"logging.wandb"):
        m.setattr(JanusPolicy, "__init__", loaded)  # (refused before minutes of loading a real checkpoint)
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "logging.wandb=true", "logging.wandb_mode=online"))
    # the refused attempts left the run's config.yaml (what eval / sample / export read) as the checkpoint's
    assert load_config(str(tmp_path / "config.yaml")).model.lora.enabled is False
    assert load_config(str(tmp_path / "config.yaml")).logging.wandb is False
    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "optim.lr=1e-4")).train()  # other settings resume
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert load_config(str(tmp_path / "config.yaml")).optim.lr == 1e-4  # (and a resumed run's config is recorded)
    # model settings whose weights still load resume, with a note naming them (a moved path is fine, a slip is seen)
    t = GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=3", "model.revision=v2"))
    assert t._resume_note.endswith("step_000002, whose weights load, but it was written with model.revision='' "
                                   "(now 'v2'); check these are intended.")
    t.close()


def test_zero_partitions_resumed_by_one_process_name_the_process_count(tmp_path):
    # one process with dist.strategy=deepspeed runs plain AdamW; a checkpoint holding 2 ranks' ZeRO partitions
    # (its optimizer.pt's record edited here: writing one takes two DeepSpeed processes) needs 2 processes again
    from imagerl.zero import ZERO_KEY

    GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=1", "checkpoint.every=1")).train()
    f = tmp_path / "checkpoints" / "step_000001" / "optimizer.pt"
    ck = torch.load(f, weights_only=False)
    torch.save({**ck, "optimizer": {ZERO_KEY: 2}}, f)
    with pytest.raises(TrainingError, match=r"holds ZeRO optimizer partitions of 2 processes and this run has one "
                                            r"process: resume with --nproc_per_node 2$"):
        GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "dist.strategy=deepspeed"))


def test_a_sharding_strategy_in_one_process_says_it_trains_plain_adamw(tmp_path, capsys):
    for strategy in ("deepspeed", "fsdp2"):
        GRPOTrainer(cfg_for("janus", tmp_path / strategy, f"dist.strategy={strategy}", "logging.console=true")).close()
        assert (f"note: dist.strategy={strategy} with one process trains with plain AdamW on whole weights"
                in capsys.readouterr().out)
    GRPOTrainer(cfg_for("janus", tmp_path / "ddp", "logging.console=true")).close()
    assert "note: dist.strategy" not in capsys.readouterr().out


@pytest.mark.parametrize("family", ["janus", "sd3"])
def test_low_precision_trained_weights_are_refused_and_lora_trains(tmp_path, family):
    # bf16 weights under AdamW drop every update below their rounding step (most of them at small lr): full
    # fine-tuning of bf16 weights is a clear error naming the fixes, while LoRA over a bf16 base trains fp32
    # adapters under bf16 autocast.
    with pytest.raises(TrainingError, match=r"trained parameters are bfloat16.*model.dtype=fp32 with run.dtype=bf16"):
        GRPOTrainer(cfg_for(family, tmp_path / "full", "model.dtype=bf16", "run.dtype=bf16"))
    with pytest.raises(TrainingError, match=r"run.dtype=fp16 trains without loss scaling.*use run.dtype=bf16"):
        GRPOTrainer(cfg_for(family, tmp_path / "fp16", "run.dtype=fp16"))
    GRPOTrainer(cfg_for(family, tmp_path / "full", "model.dtype=bf16", "run.dtype=fp16"), training=False)  # eval
    t = GRPOTrainer(cfg_for(family, tmp_path / "lora", "model.dtype=bf16", "run.dtype=bf16", "model.lora.enabled=true",
                            "model.lora.r=4", "train.steps=1", "checkpoint.every=0"))
    assert {p.dtype for p in t.params} == {torch.float32}
    before = [p.detach().clone() for p in t.params]
    t.train()
    assert all(not torch.equal(b, p) for b, p in zip(before, t.params))
    assert math.isfinite(metrics(tmp_path / "lora")[0]["loss"])
    train_fp32_inside_bf16(family, tmp_path / "mixed",
                           lambda pol: (pol.model.model.vqmodel if family == "janus" else pol.vae).parameters())
    with pytest.raises(ConfigError, match="model.trained_dtype=fp32 inside a model.dtype=bf16 model needs run.dtype=bf16"):
        cfg_for(family, tmp_path / "x", "model.dtype=bf16", "model.trained_dtype=fp32")


# FLUX's q/k torch.nn.RMSNorm then sees bf16 inputs with fp32 gains and warns that it skips its fused kernel
# (a speed note, documented in docs/flow.md)
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_trained_dtype_fp32_in_bf16_flow_transformers(tmp_path, family):
    # the other flow families' transformers under model.trained_dtype=fp32, next to bf16 text encoders and VAE
    m = train_fp32_inside_bf16(family, tmp_path, lambda pol: [*pol.vae.parameters(), *pol.text_encoder.parameters()])
    assert abs(m[0]["ratio/first_epoch_max_dev"]) < 1e-3


def train_fp32_inside_bf16(family, out, frozen_of):
    """Full fine-tuning with fp32 trained parameters inside a bf16 model (bf16 autocast), with a KL against the
    frozen copy: the trained parameters are fp32 and `frozen_of(policy)` bf16, and at lr 1e-5 every trained
    parameter moves (a bf16 one mostly would not). Returns the metrics."""
    t = GRPOTrainer(cfg_for(family, out, "model.dtype=bf16", "run.dtype=bf16", "model.trained_dtype=fp32",
                            "optim.lr=1e-5", "algorithm.kl_coef=0.01",
                            f"algorithm.kl_estimator={'k3' if family == 'janus' else 'mean'}",
                            "train.steps=2", "checkpoint.every=0"))
    assert {p.dtype for p in t.params} == {torch.float32}
    frozen = list(frozen_of(t.policy))
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    before = [p.detach().clone() for p in t.params]
    t.train()
    assert all(not torch.equal(b, p) for b, p in zip(before, t.params))
    m = metrics(out)
    assert m[1]["kl"] > 0 and math.isfinite(m[1]["loss"])
    return m


def test_eval_covers_eval_prompts_in_rounds_and_equals_one_prompt_at_a_time(tmp_path):
    # two eval sets, 2 + 3 prompts, in rounds of data.prompts_per_step=2 (the last one padded): the means are over
    # exactly those prompts' samples, each seeded by its own index whatever the batching, overall and per set
    (tmp_path / "e1.txt").write_text("a red square on the left\na blue square on the right\n")
    (tmp_path / "e2.txt").write_text("a green square on the left\na yellow square on the right\n"
                                     "a red square on the right\n")
    sets = f"data.eval_datasets=[{{path: {tmp_path}/e1.txt}}, {{path: {tmp_path}/e2.txt}}]"
    t = GRPOTrainer(cfg_for("janus", tmp_path, sets), training=False)
    metrics, ro, _ = t.eval_rollout()
    assert metrics["eval/prompts"] == 5 and len(ro) == 2 * 4  # (the first round's rollout: 2 prompts x G=4)
    from imagerl.recipes.grpo import EVAL, seeded_generator
    from imagerl.types import PromptBatch, RewardInput

    prompts = (tmp_path / "e1.txt").read_text().split("\n")[:2] + (tmp_path / "e2.txt").read_text().split("\n")[:3]
    totals = []
    for i, p in enumerate(prompts):
        one = t.sample(PromptBatch(prompts=[p], metadata=[{}]), 4, seeded_generator(t.cfg.run.seed, 0, 0, EVAL),
                       eval_mode=True, group_id_offset=i)
        totals.append(t.scorer.score(RewardInput.from_rollout(one)).weighted_total())
    t.close()
    assert metrics["eval/reward/mean"] == pytest.approx(float(torch.cat(totals).mean()), abs=1e-6)
    assert metrics["eval/e1/reward/mean"] == pytest.approx(float(torch.cat(totals[:2]).mean()), abs=1e-6)
    assert metrics["eval/e2/reward/color_position/mean"] == pytest.approx(float(torch.cat(totals[2:]).mean()), abs=1e-6)
    # train.eval_prompts caps the count (here: the first set and one prompt of the second)
    t = GRPOTrainer(cfg_for("janus", tmp_path, sets, "train.eval_prompts=3"), training=False)
    capped = t.eval_rollout()[0]
    t.close()
    assert capped["eval/prompts"] == 3
    assert capped["eval/e2/reward/mean"] == pytest.approx(float(totals[2].mean()), abs=1e-6)
    # a set's reward_weights apply at evaluation as in training: e1 counts color_position only, e2 both rewards
    weighted = (f"data.eval_datasets=[{{path: {tmp_path}/e1.txt, reward_weights: {{brightness: 0}}}}, "
                f"{{path: {tmp_path}/e2.txt}}]")
    t = GRPOTrainer(cfg_for("janus", tmp_path, weighted, "rewards=[{type: color_position}, {type: brightness}]"),
                    training=False)
    m = t.eval_rollout()[0]
    t.close()
    assert m["eval/e1/reward/mean"] == pytest.approx(m["eval/e1/reward/color_position/mean"], abs=1e-6)
    assert abs(m["eval/e2/reward/mean"] - m["eval/e2/reward/color_position/mean"]) > 1e-3


def test_first_update_deviation_metric_sees_a_log_prob_mismatch(tmp_path):
    # the ratio-1 check every test relies on must be able to fail: a training log-prob 0.01 above the rollout's
    # shows up as max |ratio - 1| = e^0.01 - 1 in the first update
    t = GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=1", "checkpoint.every=0"))
    orig = t.policy.log_prob

    def shifted(*a, **kw):
        out = orig(*a, **kw)
        out.logp = out.logp + 0.01
        return out

    t.policy.log_prob = shifted
    t.train()
    assert metrics(tmp_path)[0]["ratio/first_epoch_max_dev"] == pytest.approx(math.exp(0.01) - 1, rel=1e-3)


def test_kl_penalty_reaches_the_gradient(tmp_path):
    # same seeds, a large KL coefficient against a tiny one: the penalty must hold the policy near the reference
    kl = {}
    for c in (1e-4, 10.0):
        GRPOTrainer(cfg_for("janus", tmp_path / str(c), "train.steps=3", "checkpoint.every=0", "optim.lr=1e-2",
                            f"algorithm.kl_coef={c}", "algorithm.kl_estimator=k3")).train()
        kl[c] = metrics(tmp_path / str(c))[-1]["kl"]
    assert kl[10.0] < 0.5 * kl[1e-4]


def test_scoring_fallback_and_max_abstain_fraction(tmp_path):
    # half the prompts name no colour: with a fallback their samples are scored by it (no abstains logged), and a
    # max_abstain_fraction below one half stops the run with the fraction
    (tmp_path / "half.txt").write_text("a photo of a cat\na red square on the left\n")
    data = f"data.datasets.0.path={tmp_path}/half.txt"
    means = {}
    for fb in (0.3, 0.9):  # same seeds, same samples: only the fallback's value differs
        GRPOTrainer(cfg_for("janus", tmp_path / f"f{fb}", "train.steps=1", data, f"scoring.fallback={fb}")).train()
        m = metrics(tmp_path / f"f{fb}")[0]
        assert m["reward/abstain"] == 0 and m["reward/color_position/abstain"] == 0
        means[fb] = m["reward/mean"]
    assert means[0.9] - means[0.3] == pytest.approx(0.5 * (0.9 - 0.3), abs=1e-6)  # half the samples take it
    with pytest.raises(TrainingError, match=r"^50% of samples have no reward"):
        GRPOTrainer(cfg_for("janus", tmp_path / "g", "train.steps=1", data, "scoring.max_abstain_fraction=0.4")).train()


def test_a_monitored_reward_does_not_hide_a_weighted_one_that_abstains(tmp_path):
    # brightness is only logged (weight 0); color_position, the one trained on, abstains on every prompt (no colour).
    # The step must fail as if brightness were not there (it trained silently on all-zero advantages before)
    (tmp_path / "cats.txt").write_text("a photo of a cat\na dog on a sofa\n")
    with pytest.raises(TrainingError, match=r"^100% of samples have no reward \(every reward with a non-zero weight "
                                            r"abstained/NaN; abstains per reward: \{'brightness': 0, 'color_position': 8\}"):
        GRPOTrainer(cfg_for("janus", tmp_path / "run", "train.steps=1", f"data.datasets.0.path={tmp_path}/cats.txt",
                            "rewards=[{type: brightness, weight: 0}, {type: color_position}]")).train()


def test_mini_batches_take_several_optimizer_steps_per_rollout(tmp_path):
    # 4 prompts in 2 updates of 2 groups each: the first update's ratios are 1, the second's are not (the policy
    # moved), so the tiny clip range clips there; the LR schedule counts 2 optimizer steps per training step
    t = GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "data.prompts_per_step=4", "algorithm.mini_batches=2",
                            "algorithm.inner_epochs=1",
                            "algorithm.clip_eps_low=1e-4", "algorithm.clip_eps_high=1e-4", "optim.lr=1e-2",
                            "optim.warmup_steps=0", "checkpoint.every=0"))
    t.train()
    assert t.scheduler.last_epoch == 4
    t.close()
    m = metrics(tmp_path)
    assert all(r["ratio/first_epoch_max_dev"] < 1e-5 for r in m)
    assert all(r["ratio/max"] - r["ratio/min"] > 1e-4 and r["clip_frac"] > 0 for r in m)
    assert "kl" not in m[0] and "loss/kl" not in m[0]  # kl_coef 0: no reference forward, no KL to report
    with pytest.raises(TrainingError, match=r"^algorithm.mini_batches=3 must divide the prompts of each process"):
        GRPOTrainer(cfg_for("janus", tmp_path / "b", "data.prompts_per_step=4", "algorithm.mini_batches=3"))


class EvenGroupsAbstain(ColorPositionReward):
    """color_position, except that every sample of an even (global) group abstains."""

    def score(self, inp):
        s = super().score(inp).scores.clone()
        s[(inp.group_ids % 2) == 0] = math.nan
        return RewardOutput(scores=s)


def test_an_update_without_trained_units_still_steps_every_parameter(tmp_path):
    # mini-batch 0 holds only even groups, which all abstain: with one process no backward runs there, while with
    # K processes the ranks join the gradient sum with zeros (and DeepSpeed backwards a zero loss) and AdamW steps.
    # A missing gradient counts as zero, so every parameter takes both steps and one process updates as K do.
    t = GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=1", "data.prompts_per_step=4", "algorithm.mini_batches=2",
                            f"rewards.0.type={__name__}:EvenGroupsAbstain", "checkpoint.every=0"))
    t.train()
    steps = {int(t.optimizer.state[p]["step"]) for p in t.params}
    t.close()
    assert steps == {t.scheduler.last_epoch} == {4} and metrics(tmp_path)[0]["reward/abstain"] == 0.5


SOURCES_SEEN: list = []


class SourceSize(Reward):
    """A reward of the source image's width (abstains without one), recording what it was given."""

    def score(self, inp):
        SOURCES_SEEN.append(list(inp.source_images or []))
        return RewardOutput(scores=torch.tensor([float(s.size[0]) if s is not None else math.nan
                                                 for s in (inp.source_images or [None] * len(inp))]))


@pytest.mark.parametrize("overlap", ["true", "false"])
def test_source_images_of_editing_data_reach_the_rewards(tmp_path, overlap):
    from PIL import Image

    for w in (4, 8):
        Image.new("RGB", (w, 4), (w * 30, 0, 0)).save(tmp_path / f"s{w}.png")
    (tmp_path / "edit.jsonl").write_text("\n".join(json.dumps({"prompt": f"edit {w}", "image": f"s{w}.png"}) for w in (4, 8)))
    SOURCES_SEEN.clear()
    GRPOTrainer(cfg_for("janus", tmp_path / "run", "train.steps=1", f"data.datasets.0.path={tmp_path / 'edit.jsonl'}",
                        f"rewards.0.type={__name__}:SourceSize", f"scoring.overlap={overlap}", "rollout.micro_batch_size=4",
                        "checkpoint.every=0")).train()
    seen = [s for call in SOURCES_SEEN for s in call]
    assert len(seen) == 8 and sorted({s.size[0] for s in seen}) == [4, 8]  # 2 prompts x 4 samples, each its source
    assert metrics(tmp_path / "run")[0]["reward/mean"] == 6.0


def test_kl_and_multiple_epochs_run(tmp_path, capsys):
    t = GRPOTrainer(cfg_for("janus", tmp_path, "train.steps=2", "algorithm.kl_coef=0.04", "algorithm.inner_epochs=2",
                            "algorithm.kl_estimator=k3", "checkpoint.every=0", "train.eval_every=2",
                            "optim.warmup_steps=2", "logging.sample_every=1"))
    t.train()
    m = metrics(tmp_path)
    # the evaluation is printed too (console=false silences only the per-step lines)
    assert f"eval at step 2: reward/mean {m[1]['eval/reward/mean']:.4g}, reward/color_position/mean" in capsys.readouterr().out
    # the logged lr is the one the step's updates used: warm-up over training steps, both epochs at 1/2 then 2/2
    assert [r["lr"] for r in m] == pytest.approx([0.5e-3, 1e-3])
    assert m[1]["kl"] > 0  # the policy moved away from the frozen reference after the first update
    assert "eval/reward/mean" in m[1] and "eval/reward/mean" not in m[0]  # deterministic eval every 2 steps
    assert 0 <= m[1]["eval/reward/mean"] <= 1
    assert all(abs(r["ratio/first_epoch_max_dev"]) < 1e-5 for r in m)
    # two inner epochs: 2 optimizer steps per training step, and the second epoch is off-policy (its ratios move)
    assert t.scheduler.last_epoch == 4
    assert all(r["ratio/max"] - r["ratio/min"] > 1e-3 for r in m)
    # sample grids at the first and last step and every logging.sample_every (1 here)
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["step_000001.png", "step_000002.png"]


# (rows marked slow add little over their neighbours: flow DDP is the sd3 rows' replicated part, ZeRO-1 is
# DeepSpeed's variant of the ZeRO-2 rows, the EMA is the same elementwise code over DeepSpeed's whole
# parameters as over DDP's, LoRA under FSDP2 is the janus row's and sd3 under FSDP2 the full+kl row's, and Janus
# full fine-tuning with a KL under FSDP2 runs in test_sharded_resume_reproduces_the_uninterrupted_run, whose
# one-process resume checks it against two processes; optimizer offload is a DeepSpeed setting over the same
# ZeRO-2 partitions as the lora+kl and full+kl rows; CI stays under its time budget)
@pytest.mark.dist
@pytest.mark.parametrize("family,strategy,variant", [
    ("janus", "ddp", ""), pytest.param("sd3", "ddp", "", marks=pytest.mark.slow),
    pytest.param("sd3", "fsdp2", "lora+kl", marks=pytest.mark.slow), ("janus", "fsdp2", "lora+kl"),
    pytest.param("janus", "fsdp2", "full+kl", marks=pytest.mark.slow), ("sd3", "fsdp2", "full+kl"),
    ("janus", "deepspeed", "lora+kl"), ("sd3", "deepspeed", "full+kl"),
    pytest.param("janus", "deepspeed", "zero1+full+kl", marks=pytest.mark.slow),
    pytest.param("janus", "deepspeed", "offload", marks=pytest.mark.slow), ("janus", "ddp", "accelerate"),
    ("janus", "fsdp2", "ema"),
    pytest.param("janus", "deepspeed", "ema", marks=pytest.mark.slow),
])
def test_two_processes_equal_one(tmp_path, family, strategy, variant):
    """torchrun with 2 CPU processes (gloo) must produce the same metrics and weights as a single process:
    replicated (ddp), sharded (fsdp2: with LoRA and a KL against the LoRA-disabled model, and with full
    fine-tuning and a KL against the frozen initial weights, kept as this rank's shards), and DeepSpeed ZeRO-2
    / ZeRO-1 (partitioned gradients and AdamW state, the loop's own micro-batching and loss weights)."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    extra = ["algorithm.timestep_fraction=0.5"] if family == "sd3" else []
    if variant.startswith("zero1"):
        extra += ["dist.zero_stage=1"]
    if variant == "offload":  # ZeRO-2 with the AdamW partitions in host memory, via dist.deepspeed_extra
        extra += ["dist.deepspeed_extra.zero_optimization.offload_optimizer.device=cpu",
                  "dist.deepspeed_extra.zero_force_ds_cpu_optimizer=false"]
    if variant == "lora+kl":
        extra += ["model.lora.enabled=true", "model.lora.r=4"]
    if (family, strategy, variant) == ("janus", "ddp", ""):  # two optimizer steps per rollout, each on whole groups
        # (and an estimator with a whole-batch statistic: the batch std must be the global batch's)
        extra += ["data.prompts_per_step=4", "algorithm.mini_batches=2", "algorithm.clip_eps_low=1e-3",
                  "algorithm.clip_eps_high=1e-3", "algorithm.advantage=global_std"]
    if (family, strategy, variant) == ("sd3", "deepspeed", "full+kl"):
        extra += ["algorithm.advantage=gdpo"]  # per-group z-scores, then a batch z-score over all processes' samples
    if variant == "ema":  # each rank averages its shards; the step-2 evaluation runs on the average
        # 3 eval prompts in rounds of 2 split over the ranks: the padding and the reduction are checked too
        extra += ["optim.ema_decay=0.9", "train.eval_every=2", "train.eval_prompts=3"]
    if variant.endswith("kl"):  # full fine-tuning: the reference is this rank's shards of the initial weights
        # (a KL coefficient large enough that a wrong reference on one rank would move the weights measurably; the
        # flow mean-space KL divides by the small late-step variances, so its term is already large at 0.1)
        extra += [f"algorithm.kl_coef={0.1 if family == 'sd3' else 1.0}",
                  f"algorithm.kl_estimator={'mean' if family == 'sd3' else 'k3'}"]
    if family == "sd3" and variant == "full+kl":  # with the auxiliary SFT loss: its pairs are split over the ranks
        extra += ["algorithm.sft_weight=0.3", "algorithm.sft_batch_size=4", "data.sft_datasets=[{path: builtin:color_shapes}]"]
    if (family, strategy, variant) == ("sd3", "fsdp2", "full+kl"):
        # an EMA evaluation right before the final save: the flow transformer's root FSDP2 unit must be resharded
        # after the no-grad forwards (it stayed gathered, holding the average, and the save then failed)
        extra += ["optim.ema_decay=0.9", "train.eval_every=2"]
    args = ["train", *FAMILY_OVERRIDES[family], *COMMON, *extra, "train.steps=2", "checkpoint.every=0",
            "checkpoint.save_final=true", "run.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "imagerl.cli", *args, f"run.output_dir={tmp_path}/one"],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    port = ({"janus": 29533, "sd3": 29534}[family]
            + {"": 0, "lora+kl": 10, "full+kl": 20, "zero1+full+kl": 30, "offload": 40, "accelerate": 50, "ema": 60}[variant]
            + {"ddp": 0, "fsdp2": 0, "deepspeed": 100}[strategy])
    if variant == "accelerate":  # accelerate's launcher starts the processes the way torchrun does
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                  str(port), "-m"]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m"]
    two = subprocess.run([*launch, "imagerl.cli", *args, f"dist.strategy={strategy}", f"run.output_dir={tmp_path}/two"],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"2 processes: dist.strategy={strategy}, gloo" in two.stdout, two.stdout[-2000:]
    for noise in ("Setting accelerator to CPU",  # DeepSpeed's on a machine without a GPU
                  "all_gather_into_tensor` is deprecated",  # torch's, about DeepSpeed's ZeRO code
                  "returned a view tensor"):  # FSDP2's, about transformers' Janus aligner (see JanusPolicy._image_embeds)
        assert noise not in two.stdout + two.stderr, noise
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(a) == len(b) == 2
    if variant.endswith("kl"):  # the reference really differs from the policy after the first update
        assert b[1]["kl"] > 0
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:  # every logged number (but timings), to summation-order rounding: an absolute bound because a
            # loss near 0 is a float32 sum of O(1) terms (advantages cancel) rounded in another order: 1.2e-6 apart on
            # the SD3 DDP row (at 9e-6, while grad_norm agreed to 7e-9 and ratios to 2e-7), hence 3e-6 for losses
            if not k.startswith("time/"):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=3e-6 if k.startswith("loss") else 1e-6), k
    if variant == "ema":
        assert "eval/reward/mean" in b[1]
        # `imagerl eval` under torchrun: the same numbers as one process, and a grid of the whole first round (each
        # process rolled out half of it; the grid showed rank 0's half before)
        from PIL import Image

        ev_one = subprocess.run([sys.executable, "-m", "imagerl.cli", "eval", f"run.output_dir={tmp_path}/one"],
                                capture_output=True, text=True, env=env)
        ev_two = subprocess.run([*launch, "imagerl.cli", "eval", f"run.output_dir={tmp_path}/two", f"dist.strategy={strategy}"],
                                capture_output=True, text=True, env=env)
        assert ev_one.returncode == 0 and ev_two.returncode == 0, ev_two.stderr[-2000:]
        ja, jb = (json.loads((tmp_path / r / "eval/step_000002.json").read_text()) for r in ("one", "two"))
        assert ja.keys() == jb.keys() and all(ja[k] == pytest.approx(jb[k], abs=1e-5) for k in ja if k != "checkpoint")
        assert "(the first 8 images)" in ev_one.stdout and "(the first 8 images)" in ev_two.stdout, ev_two.stdout
        sizes = [Image.open(tmp_path / r / "eval/step_000002.png").size for r in ("one", "two")]
        assert sizes[0] == sizes[1], sizes
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "one/checkpoints/step_000002/trainable.safetensors")
    wb = load_file(tmp_path / "two/checkpoints/step_000002/trainable.safetensors")  # gathered from shards
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-4)


@pytest.mark.dist
def test_deepspeed_keeps_fp32_master_weights_for_bf16_weights(tmp_path):
    """The trainer refuses AdamW on bf16 trained weights except under DeepSpeed, whose ZeRO optimizer steps fp32
    master partitions: after one step at lr 1e-6 (the Janus-Pro recipe's), the saved masters hold updates finer
    than bf16 can represent (a master equal to its own bf16 rounding would mean the update was lost)."""
    pytest.importorskip("deepspeed")
    args = ["train", *FAMILY_OVERRIDES["janus"], *COMMON, "model.dtype=bf16", "run.dtype=bf16", "optim.lr=1e-6",
            "optim.warmup_steps=0", "train.steps=1", "checkpoint.every=1", "run.threads=1", "dist.strategy=deepspeed",
            f"run.output_dir={tmp_path}"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29597",
                        "-m", "imagerl.cli", *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    finer = total = 0
    for rank in (0, 1):
        sd = torch.load(tmp_path / f"checkpoints/step_000001/zero/rank_{rank:05d}.pt", weights_only=False)
        for master in sd["single_partition_of_fp32_groups"]:
            assert master.dtype == torch.float32
            finer += int((master != master.bfloat16().float()).sum())
            total += master.numel()
    assert finer > 0.5 * total, (finer, total)  # (padding and zero-gradient entries stay bf16-exact)


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp2_shards_fp32_trained_weights_of_a_bf16_janus(tmp_path):
    """model.trained_dtype=fp32 under 2-process FSDP2: the shards are the fp32 trained parameters (the bf16 VQ
    model stays outside them), every saved weight is fp32 and moved from the initial one, and the KL against
    the sharded frozen copy is live. (bf16 sampling on half the rows per process is not bit-equal to one
    process, so this row checks training, not equality.)"""
    from safetensors.torch import load_file

    args = ["train", *FAMILY_OVERRIDES["janus"], *COMMON, "model.dtype=bf16", "run.dtype=bf16", "model.trained_dtype=fp32",
            "optim.lr=1e-5", "algorithm.kl_coef=0.01", "algorithm.kl_estimator=k3", "train.steps=2", "checkpoint.every=0",
            "checkpoint.save_final=true", "run.threads=1", "dist.strategy=fsdp2", f"run.output_dir={tmp_path}"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29599",
                        "-m", "imagerl.cli", *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    m = metrics(tmp_path)
    assert len(m) == 2 and m[1]["kl"] > 0 and all(math.isfinite(r["loss"]) for r in m)
    saved = load_file(tmp_path / "checkpoints/step_000002/trainable.safetensors")
    init = dict(GRPOTrainer(cfg_for("janus", tmp_path / "init", "model.dtype=bf16", "run.dtype=bf16",
                                    "model.trained_dtype=fp32"), training=False).policy.named_trainable_parameters())
    assert saved.keys() == init.keys()
    assert all(w.dtype == torch.float32 for w in saved.values())
    assert all(not torch.equal(saved[k], init[k].detach()) for k in saved)


@pytest.mark.dist
# (deepspeed in the slow suite: 60 s here, and the fast suite keeps FSDP2's resume plus DeepSpeed's 2-process rows)
@pytest.mark.parametrize("strategy", ["fsdp2", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_sharded_resume_reproduces_the_uninterrupted_run(tmp_path, strategy):
    """2 processes, dist.strategy=fsdp2 or deepspeed (ZeRO-2), Janus full fine-tuning with a KL term: stop
    after the step-2 checkpoint, rerun the same command, and step 3 equals step 3 of an uninterrupted run.
    Covers the gathered weights and the per-rank optimizer pieces loading back into shards / ZeRO partitions,
    and the frozen reference (taken before the checkpoint is loaded) being the initial weights, not the resumed
    ones. FSDP2 also changes the process count both ways (its DCP optimizer shards reshard)."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    args = ["train", *FAMILY_OVERRIDES["janus"], *COMMON, "algorithm.kl_coef=0.01", "algorithm.kl_estimator=k3",
            "checkpoint.every=2", "run.threads=1", f"dist.strategy={strategy}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, steps, port, *more):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(port), "-m", "imagerl.cli", *args, f"train.steps={steps}", f"run.output_dir={out}",
                               *more], capture_output=True, text=True, env=env)

    port = 29571 + (10 if strategy == "deepspeed" else 0)
    full_steps = 4 if strategy == "fsdp2" else 3  # fsdp2: step 4 checks a resume from a one-process checkpoint
    for out, steps, i in ((tmp_path / "full", full_steps, 0), (tmp_path / "cut", 2, 1), (tmp_path / "cut", 3, 2)):
        if i == 2:  # keep a copy of the stopped run for the one-process resume below
            shutil.copytree(tmp_path / "cut", tmp_path / "cut1")
        p = run(out, steps, port + i)  # the last one resumes from checkpoints/step_000002
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3]
    assert b[2]["kl"] > 0
    for k in ("reward/mean", "loss", "kl", "grad_norm", "ratio/mean", "clip_frac"):
        assert a[2][k] == b[2][k], k  # exact: same processes, same order of operations
    if strategy == "fsdp2":
        # every rank wrote its own shards of the AdamW state (torch.distributed.checkpoint), nothing gathered
        shards = sorted(os.listdir(tmp_path / "cut" / "checkpoints" / "step_000003" / "optimizer"))
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
        # DCP reshards: the 2-process checkpoint resumes in one process, to the numbers of the 2-process run
        # (approximately: one process sums in another order)
        p = subprocess.run([sys.executable, "-m", "imagerl.cli", *args, "train.steps=3", "dist.strategy=none",
                            f"run.output_dir={tmp_path / 'cut1'}"], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        c = metrics(tmp_path / "cut1")
        assert [r["step"] for r in c] == [1, 2, 3]
        # and the other way: the full AdamW state this one process wrote loads into the 2 processes' shards
        p = run(tmp_path / "cut1", 4, port + 3)
        assert p.returncode == 0, p.stderr[-3000:]
        c = metrics(tmp_path / "cut1")
        assert [r["step"] for r in c] == [1, 2, 3, 4]
        for k in ("reward/mean", "loss", "kl", "grad_norm", "ratio/mean"):
            assert c[2][k] == pytest.approx(a[2][k], rel=1e-4, abs=1e-6), k
            assert c[3][k] == pytest.approx(a[3][k], rel=1e-4, abs=1e-6), k
    if strategy == "deepspeed":
        ck = tmp_path / "cut" / "checkpoints" / "step_000003"
        assert sorted(os.listdir(ck / "zero")) == ["rank_00000.pt", "rank_00001.pt"]  # each rank's own partition
        # ZeRO partitions cannot be loaded as a full AdamW state: a clear error, not a crash
        p = run(tmp_path / "cut", 4, port + 3, "dist.strategy=ddp")
        assert p.returncode != 0 and "resume with the strategy that wrote it" in p.stderr, p.stderr[-2000:]
        # but evaluating the checkpoint needs its weights only, in one process
        p = subprocess.run([sys.executable, "-m", "imagerl.cli", "eval", f"run.output_dir={tmp_path / 'cut'}"],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 0 and (ck.parent.parent / "eval" / "step_000003.json").exists(), p.stderr[-2000:]


def test_sft_term_enters_the_gradient_with_its_weight(tmp_path):
    """With algorithm.sft_weight = w the update's gradient is (1 - w) x the GRPO gradient + w x the SFT loss's
    gradient, each computed on its own from the same rollout and the same SFT pairs."""
    w = 0.3
    sft = ["data.sft_datasets=[{path: builtin:color_shapes}]", "algorithm.sft_batch_size=2"]
    common = ["train.steps=1", "checkpoint.every=0", "optim.lr=0", "optim.grad_clip=0", "algorithm.inner_epochs=1",
              "optim.warmup_steps=0"]

    def grads(trainer):
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.params]

    both = GRPOTrainer(cfg_for("sd3", tmp_path / "a", *common, *sft, f"algorithm.sft_weight={w}"))
    both.step(1)
    g_both = grads(both)
    grpo = GRPOTrainer(cfg_for("sd3", tmp_path / "b", *common))
    grpo.step(1)  # (the same seeds: the same rollout)
    g_grpo = grads(grpo)
    both.optimizer.zero_grad(set_to_none=True)
    both._sft_step(1, 0, 0)  # the same pairs and noise as in the update above: w x the SFT gradient alone
    g_sft = grads(both)
    for a, b, c in zip(g_both, g_grpo, g_sft):
        torch.testing.assert_close(a, (1 - w) * b + c, atol=1e-6, rtol=1e-4)
    assert max(float(c.abs().max()) for c in g_sft) > 0 and max(float(b.abs().max()) for b in g_grpo) > 0
    both.close()
    grpo.close()


@pytest.mark.parametrize("family,extra", [("janus", []), ("sd3", ["algorithm.timestep_fraction=0.5", "algorithm.loss_agg=seq_mean",
                                                                 "algorithm.kl_coef=0.1"])])
def test_micro_batches_accumulate_the_whole_batch_gradient(tmp_path, family, extra):
    """algorithm.micro_batch_size only splits the work: one sample per backward gives the gradient of the whole batch
    in one backward (the loss weights are the whole update's)."""
    common = ["train.steps=1", "checkpoint.every=0", "optim.lr=0", "optim.grad_clip=0", "algorithm.inner_epochs=1",
              "optim.warmup_steps=0", *extra]
    got = []
    for mb in (1, 8):
        t = GRPOTrainer(cfg_for(family, tmp_path / f"mb{mb}", *common, f"algorithm.micro_batch_size={mb}"))
        t.step(1)
        got.append([p.grad.detach().clone() for p in t.params])
        t.close()
    assert max(float(g.abs().max()) for g in got[1]) > 0
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


class ShiftedSD3(SD3Policy):
    """A user's own policy adapter, referenced as model.family: test_trainer:ShiftedSD3 (the README's
    'package.module:Class' form): SD3 with every latent's start noise scaled, a change a researcher might try."""

    def _randn(self, shape, generator):
        return 0.9 * super()._randn(shape, generator)


def test_a_policy_adapter_of_ones_own_trains_by_module_and_class(tmp_path):
    over = [o for o in FAMILY_OVERRIDES["sd3"] if not o.startswith("model.family")]
    cfg = load_config(None, [f"model.family={__name__}:ShiftedSD3", *over, *COMMON, f"run.output_dir={tmp_path}",
                             "train.steps=1", "checkpoint.every=0"])
    t = GRPOTrainer(cfg)
    assert type(t.policy).__mro__[1].__name__ == "SD3Policy"
    t.train()
    m = metrics(tmp_path)
    assert m[0]["ratio/first_epoch_max_dev"] < 1e-5 and m[0]["grad_norm"] > 0
