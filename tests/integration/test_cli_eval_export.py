"""`imagerl eval` and `imagerl export` on a finished (tiny) run, through the CLI entry point."""

import json

import pytest

from imagerl.cli import main


def test_train_eval_export(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "model.tiny_size=test", "train.steps=2", "data.prompts_per_step=2", "rollout.group_size=4",
                 f"run.output_dir={run}", "logging.progress_bar=false", "logging.sample_every=0"]) == 0
    before = (run / "metrics.jsonl").read_text()
    # the run's own config.yaml is used when only run.output_dir is given
    assert main(["eval", f"run.output_dir={run}"]) == 0
    res = json.loads((run / "eval" / "step_000002.json").read_text())
    assert 0.0 <= res["eval/reward/mean"] <= 1.0 and res["checkpoint"].endswith("step_000002")
    assert (run / "eval" / "step_000002.png").stat().st_size > 0
    assert (run / "metrics.jsonl").read_text() == before  # evaluation leaves the training log alone
    assert main(["export", f"run.output_dir={run}", "--to", str(tmp_path / "exp")]) == 0
    from transformers import JanusForConditionalGeneration

    model = JanusForConditionalGeneration.from_pretrained(tmp_path / "exp")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint in .*train first"):
        main(["eval", f"run.output_dir={tmp_path / 'empty'}"])
