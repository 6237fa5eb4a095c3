"""`imagerl eval`, `imagerl sample` and `imagerl export` on a finished (tiny) run, through the CLI entry point."""

import json

import pytest

from imagerl.cli import main


def test_train_eval_export(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "model.tiny_size=test", "train.steps=2", "data.prompts_per_step=2", "rollout.group_size=4",
                 f"run.output_dir={run}", "logging.progress_bar=false", "logging.sample_every=0", "train.eval_every=2",
                 "optim.lr=1e-2"]) == 0
    # the closing lines name every output the README lists, each of which exists
    done = capsys.readouterr().out.split("Done. Output in ")[1].splitlines()[1:]
    named = {line.split()[0]: line.split()[1] for line in done if line.strip()}
    assert set(named) == {"metrics", "reward_curve", "checkpoints", "config"}  # (samples/: none with sample_every=0)
    assert all(__import__("os").path.exists(p) for p in named.values()), named
    before = (run / "metrics.jsonl").read_text()
    # the run's own config.yaml is used when only run.output_dir is given
    assert main(["eval", f"run.output_dir={run}"]) == 0
    res = json.loads((run / "eval" / "step_000002.json").read_text())
    assert res["checkpoint"].endswith("step_000002")
    # the checkpoint's weights: the same numbers as the evaluation the run made at step 2
    logged = json.loads(before.splitlines()[-1])
    assert res["eval/reward/mean"] == logged["eval/reward/mean"] and 0.0 <= res["eval/reward/mean"] <= 1.0
    assert (run / "eval" / "step_000002.png").stat().st_size > 0
    assert (run / "metrics.jsonl").read_text() == before  # evaluation leaves the training log alone
    # prompts every reward abstains on: the mean is null in strict JSON, not NaN
    (tmp_path / "nocolour.txt").write_text("a photo of a cat\n")
    assert main(["eval", f"run.output_dir={run}", f"data.eval_datasets=[{{path: {tmp_path}/nocolour.txt}}]"]) == 0
    strict = json.loads((run / "eval" / "step_000002.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert strict["eval/reward/mean"] is None
    # sample: your prompts, n images each, seeded (the same seed gives the same files), scored by the run's rewards
    for out in ("s1", "s2"):
        assert main(["sample", f"run.output_dir={run}", "--prompt", "a red square on the left", "--prompt",
                     "a green circle at the top", "--n", "3", "--seed", "7", "--out", str(tmp_path / out)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "s1" / "samples.jsonl").read_text().splitlines()]
    assert [(x["prompt"][:7], x["sample"]) for x in lines] == [("a red s", 0), ("a red s", 1), ("a red s", 2),
                                                                ("a green", 0), ("a green", 1), ("a green", 2)]
    assert all(0 <= x["reward"] <= 1 and x["rewards"]["color_position"] == x["reward"] for x in lines)
    assert all(x["checkpoint"].endswith("step_000002") for x in lines)
    for x in lines:
        assert (tmp_path / "s1" / x["file"]).read_bytes() == (tmp_path / "s2" / x["file"]).read_bytes()
    assert len({(tmp_path / "s1" / x["file"]).read_bytes() for x in lines}) > 1  # the n samples differ
    # the checkpoint, not the initial weights: the same prompts and seed from --base give other images
    assert main(["sample", f"run.output_dir={run}", "--prompt", "a red square on the left", "--prompt",
                 "a green circle at the top", "--n", "3", "--seed", "7", "--out", str(tmp_path / "s0"), "--base"]) == 0
    assert any((tmp_path / "s0" / x["file"]).read_bytes() != (tmp_path / "s1" / x["file"]).read_bytes() for x in lines)
    assert (tmp_path / "s1" / "grid_000.png").stat().st_size > 0
    # the initial weights (no checkpoint needed), a prompt file, no scoring; default output under the run
    (tmp_path / "p.txt").write_text("a blue square on the right\n")
    assert main(["sample", f"run.output_dir={run}", "--prompts", str(tmp_path / "p.txt"), "--n", "2", "--base",
                 "--no-score"]) == 0
    base = [json.loads(x) for x in (run / "sample" / "base" / "samples.jsonl").read_text().splitlines()]
    assert len(base) == 2 and base[0]["checkpoint"] == "base" and "reward" not in base[0]
    # --images: --n under a name torchrun's parser lets through (it stops at `--n`, a prefix of its --nnodes)
    from torch.distributed.run import get_args_parser

    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["-m", "imagerl.cli", "sample", "--n", "2"])
    get_args_parser().parse_args(["-m", "imagerl.cli", "sample", "--images", "2"])
    assert main(["sample", f"run.output_dir={run}", "--prompts", str(tmp_path / "p.txt"), "--images", "3", "--base",
                 "--no-score", "--out", str(tmp_path / "s3")]) == 0
    assert len((tmp_path / "s3" / "samples.jsonl").read_text().splitlines()) == 3
    # sampling again into the same folder leaves only this call's images next to its samples.jsonl
    assert main(["sample", f"run.output_dir={run}", "--prompt", "x", "--images", "1", "--base", "--no-score", "--out",
                 str(tmp_path / "s3")]) == 0
    assert sorted(p.name for p in (tmp_path / "s3").glob("*.png")) == ["0000_0.png", "grid_000.png"]
    with pytest.raises(SystemExit, match=r"--n and --images are the same option"):
        main(["sample", f"run.output_dir={run}", "--prompt", "x", "--n", "2", "--images", "2"])
    with pytest.raises(SystemExit, match=r"--prompt TEXT \(repeatable\) or --prompts FILE"):
        main(["sample", f"run.output_dir={run}"])
    with pytest.raises(SystemExit, match=r"--prompts: prompt file .*does not exist"):
        main(["sample", f"run.output_dir={run}", "--prompts", str(tmp_path / "missing.txt")])
    # reading the checkpoint with other model settings: one line naming what changed, not a traceback
    with pytest.raises(SystemExit, match=r"^imagerl: TrainingError: .*written with model.lora.enabled=False \(now True\)"):
        main(["eval", f"run.output_dir={run}", "model.lora.enabled=true"])
    # a reward that fails during eval (a reward server that is down): one line too, as train prints it
    with pytest.raises(SystemExit, match=r"^imagerl: RewardServerDownError: reward server at http://127.0.0.1:9 is down"):
        main(["eval", f"run.output_dir={run}", "rewards.0.type=remote", "rewards.0.args={url: 'http://127.0.0.1:9', timeout: 1}"])
    # another prompt column for sample --prompts
    (tmp_path / "cap.jsonl").write_text(json.dumps({"caption": "a red square"}) + "\n")
    with pytest.raises(SystemExit, match=r"has no 'prompt' field \(fields: caption\)\. Pass --prompt-field <name>"):
        main(["sample", f"run.output_dir={run}", "--prompts", str(tmp_path / "cap.jsonl"), "--base", "--no-score"])
    assert main(["sample", f"run.output_dir={run}", "--prompts", str(tmp_path / "cap.jsonl"), "--prompt-field", "caption",
                 "--n", "2", "--base", "--no-score", "--out", str(tmp_path / "s4")]) == 0
    # a mistyped option, or an output directory that cannot be made: one line naming it, before any work
    with pytest.raises(SystemExit, match=r"^imagerl: unknown option '--nn': `imagerl sample --help` lists the options$"):
        main(["sample", f"run.output_dir={run}", "--prompt", "x", "--nn", "2"])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=r"^imagerl: --out=.*a_file/s: cannot write there \(.*\); give a writable"):
        main(["sample", f"run.output_dir={run}", "--prompt", "x", "--out", str(tmp_path / "a_file" / "s")])
    with pytest.raises(SystemExit, match=r"^imagerl: --to=.*a_file/e: cannot write there"):
        main(["export", f"run.output_dir={run}", "--to", str(tmp_path / "a_file" / "e")])
    assert main(["export", f"run.output_dir={run}", "--to", str(tmp_path / "exp")]) == 0
    from transformers import JanusForConditionalGeneration

    model = JanusForConditionalGeneration.from_pretrained(tmp_path / "exp")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_commands_read_the_checkpoint_of_a_run_started_with_resume_false(tmp_path, capsys):
    # run.resume=false (how a fresh run is started) is kept in config.yaml: eval / sample / export must still read the
    # checkpoint (they evaluated the initial weights as "base", and export crashed after writing them)
    run = tmp_path / "run"
    assert main(["train", "model.tiny_size=test", "train.steps=1", "data.prompts_per_step=2", "rollout.group_size=2",
                 f"run.output_dir={run}", "logging.progress_bar=false", "logging.sample_every=0", "run.resume=false",
                 "checkpoint.every=1"]) == 0
    assert main(["eval", f"run.output_dir={run}"]) == 0
    res = json.loads((run / "eval" / "step_000001.json").read_text())
    assert res["checkpoint"].endswith("step_000001") and res["ema"] is False
    assert main(["export", f"run.output_dir={run}"]) == 0 and (run / "export" / "step_000001").is_dir()
    # an existing directory that cannot be written: one line before any sampling (a traceback after it, before)
    with pytest.raises(SystemExit, match=r"^imagerl: --out=/sys: cannot write there \(Permission denied\)"):
        main(["sample", f"run.output_dir={run}", "--prompt", "x", "--out", "/sys"])
    from imagerl.recipes.grpo import GRPOTrainer

    import shutil

    shutil.rmtree(run / "eval")
    (run / "eval").write_text("")  # (a file where eval's folder goes)
    with pytest.MonkeyPatch.context() as m:  # (eval: before its rollouts, which would otherwise run first)
        m.setattr(GRPOTrainer, "eval_rollout", lambda self: pytest.fail("evaluated before checking the output dir"))
        with pytest.raises(SystemExit, match=r"^imagerl: run.output_dir=.*run/eval: cannot write there"):
            main(["eval", f"run.output_dir={run}"])
    # a run that keeps an EMA, read with optim.ema_decay=0: its files are the trained weights', next to the EMA's
    ema = tmp_path / "ema"
    assert main(["train", "model.tiny_size=test", "train.steps=1", "data.prompts_per_step=2", "rollout.group_size=2",
                 f"run.output_dir={ema}", "logging.progress_bar=false", "logging.sample_every=0", "optim.ema_decay=0.5",
                 "checkpoint.every=1"]) == 0
    assert main(["eval", f"run.output_dir={ema}", "optim.ema_decay=0"]) == 0
    assert json.loads((ema / "eval" / "step_000001_no_ema.json").read_text())["ema"] is False
    assert not (ema / "eval" / "step_000001.json").exists()
    # without its config.yaml the run's settings are unknown: said, instead of evaluating with the demo's settings
    (run / "config.yaml").unlink()
    with pytest.raises(SystemExit, match=r"^imagerl eval: .*run/config.yaml is missing: it holds the run's settings .*"
                                         r"pass the run's CONFIG: imagerl eval CONFIG run.output_dir="):
        main(["eval", f"run.output_dir={run}"])


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint in .*train first .* at a run$"):  # (no --base: sample's option)
        main(["eval", f"run.output_dir={tmp_path / 'empty'}"])
    with pytest.raises(SystemExit, match="no checkpoint in .*sample the initial weights with --base"):
        main(["sample", f"run.output_dir={tmp_path / 'empty'}", "--prompt", "a red square"])


def test_export_under_a_launcher_says_to_run_one_process(tmp_path, monkeypatch):
    # checkpoints hold whole weights: export is a one-process job, and rank 0 of a launch says so (the launch is
    # faked by the variables torchrun sets: export stops before any process group would be made)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match=r"^imagerl export: run it as one process, without torchrun"):
        main(["export", f"run.output_dir={tmp_path}"])
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        main(["export", f"run.output_dir={tmp_path}"])
    assert e.value.code == 1


def test_errors_that_may_be_bugs_say_how_to_get_the_traceback(capsys, monkeypatch):
    from imagerl.cli import _fail
    from imagerl.data.prompts import DataError

    # ours name the field and the fix: one line; a builtin ValueError may be a bug in a custom reward: the hint
    assert str(_fail(DataError("data.datasets[0].path: gone"))) == "imagerl: DataError: data.datasets[0].path: gone"
    assert str(_fail(ValueError("invalid literal"))).endswith("invalid literal (IMAGERL_DEBUG=1 prints the traceback)")
    monkeypatch.setenv("IMAGERL_DEBUG", "1")
    try:
        raise ValueError("invalid literal")
    except ValueError as e:
        assert str(_fail(e)) == "imagerl: ValueError: invalid literal"
    assert "Traceback" in capsys.readouterr().err


def test_export_and_sample_do_not_need_the_training_prompts(tmp_path, monkeypatch):
    # a run trained on a relative prompt path, exported and sampled from another directory: neither reads it
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.txt").write_text("a red square on the left\n")
    monkeypatch.chdir(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "model.tiny_size=test", "train.steps=1", "data.prompts_per_step=1", "rollout.group_size=2",
                 "data.datasets.0.path=p.txt", f"run.output_dir={run}", "logging.progress_bar=false",
                 "logging.sample_every=0"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["export", f"run.output_dir={run}", "--to", str(tmp_path / "exp")]) == 0
    assert main(["sample", f"run.output_dir={run}", "--prompt", "x", "--n", "1", "--no-score", "--out", str(tmp_path / "s")]) == 0
    with pytest.raises(SystemExit, match=r"data.datasets\[0\].path: prompt file 'p.txt' does not exist"):
        main(["eval", f"run.output_dir={run}"])  # (eval without an eval set does read them)


def test_sample_totals_use_each_prompts_own_images():
    """`imagerl sample`'s per-image total: an abstain counts as the reward's mean over the same prompt's images, never
    the other prompts' (before, one image's total changed with the other prompts on the command line); a reward that
    scored none of a prompt's images leaves its totals null."""
    import math

    import torch

    from imagerl.cli import _per_prompt_totals
    from imagerl.rewards.base import ScoreTable

    nan = math.nan

    def totals(b_scores):
        scores = torch.tensor([[0.5, 0.2], [0.7, nan], [0.1, nan], [0.3, nan]] if b_scores is None else
                              [[0.5, 0.2], [0.7, nan], *b_scores])
        w = torch.tensor([1.0, 2.0]).expand(4, 2)
        return _per_prompt_totals(ScoreTable(["a", "b"], scores, w, {}, torch.tensor([0, 0, 1, 1])), None)

    t = totals(None)
    assert t[:2].tolist() == pytest.approx([0.5 + 0.4, 0.7 + 0.4])  # b's abstain: its mean over prompt 0's images
    assert torch.isnan(t[2:]).all()  # b scored none of prompt 1's images
    assert totals([[0.1, 0.9], [0.3, 0.8]])[:2].tolist() == pytest.approx(t[:2].tolist())  # prompt 1 changes nothing
    # a reward of weight 0 is not in the total: its abstaining on a whole prompt leaves that prompt's totals known
    w0 = torch.tensor([1.0, 0.0]).expand(4, 2)
    t0 = _per_prompt_totals(ScoreTable(["a", "b"], torch.tensor([[0.5, 0.2], [0.7, nan], [0.1, nan], [0.3, nan]]), w0,
                                       {}, torch.tensor([0, 0, 1, 1])), None)
    assert t0.tolist() == pytest.approx([0.5, 0.7, 0.1, 0.3])


def test_a_start_error_is_said_once_per_node_and_a_training_error_by_every_rank(monkeypatch):
    from imagerl.cli import _fail
    from imagerl.config import ConfigError
    from imagerl.data.prompts import DataError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr("time.sleep", lambda s: None)  # (the quiet ranks wait for local rank 0 to speak)
    assert _fail(ConfigError("bad key"), at_start=True).code == 1  # local rank 0 says it
    # raised while training (a rank's own share of the SFT images, say): this rank may be the only one that sees it
    assert _fail(DataError("corrupt image"), at_start=False).code == "imagerl: DataError: corrupt image"
    for env in ({"LOCAL_RANK": "0"}, {"WORLD_SIZE": "1"}, {"LOCAL_RANK": "x"}):  # (a leftover or odd LOCAL_RANK)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert _fail(ConfigError("bad key"), at_start=True).code == "imagerl: ConfigError: bad key"
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "1")


def test_janus_export_carries_its_processor(tmp_path):
    # an export is used like the original checkpoint: transformers' JanusProcessor loads from it and its inputs drive
    # the exported model's own image generation; a run on the export (the real-checkpoint path) carries the processor
    # into its own export; a checkpoint without one exports weights and tokenizer, with a warning that says so
    import torch
    from transformers import JanusForConditionalGeneration, JanusProcessor

    common = ["train.steps=1", "data.prompts_per_step=2", "rollout.group_size=2", "logging.progress_bar=false",
              "logging.sample_every=0", "run.threads=1"]
    assert main(["train", "model.tiny_size=test", f"run.output_dir={tmp_path / 'run'}", *common]) == 0
    assert main(["export", f"run.output_dir={tmp_path / 'run'}", "--to", str(tmp_path / "exp")]) == 0
    model = JanusForConditionalGeneration.from_pretrained(tmp_path / "exp").eval()
    proc = JanusProcessor.from_pretrained(tmp_path / "exp")
    inputs = proc(text=["a red square on the left"], generation_mode="image", return_tensors="pt")
    assert inputs["input_ids"][0, -1].item() == proc.tokenizer.convert_tokens_to_ids("<begin_of_image>")
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = model.generate(**inputs, generation_mode="image", do_sample=True, guidance_scale=5.0)
        image = model.decode_image_tokens(tokens)
    grid = model.config.vq_config.num_patches
    assert tokens.shape == (1, grid * grid) and image.shape[0] == 1 and torch.isfinite(image).all()
    # and image understanding: the processor expands <image> to as many tokens as the vision tower gives
    from PIL import Image

    side = model.config.vision_config.image_size
    inputs = proc(text=["<image>what colour is this?"], images=[Image.new("RGB", (side, side), (200, 30, 30))],
                  return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()

    assert main(["train", "model.tiny=false", f"model.path={tmp_path / 'exp'}", f"run.output_dir={tmp_path / 'run2'}",
                 *common]) == 0
    assert main(["export", f"run.output_dir={tmp_path / 'run2'}", "--to", str(tmp_path / "exp2")]) == 0
    assert JanusProcessor.from_pretrained(tmp_path / "exp2").tokenizer.image_token == "<image>"

    (tmp_path / "exp2" / "processor_config.json").unlink()  # (weights and a tokenizer only)
    assert main(["train", "model.tiny=false", f"model.path={tmp_path / 'exp2'}", f"run.output_dir={tmp_path / 'run3'}",
                 *common]) == 0
    with pytest.warns(UserWarning, match=r"has no processor .* holds the weights and the tokenizer only"):
        assert main(["export", f"run.output_dir={tmp_path / 'run3'}", "--to", str(tmp_path / "exp3")]) == 0
    assert (tmp_path / "exp3" / "tokenizer.json").exists() and not (tmp_path / "exp3" / "processor_config.json").exists()
