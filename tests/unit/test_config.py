"""Config loading: files, overrides, env vars, jsonnet, and errors that name the key and the fix."""

import pytest

from imagerl.config import ConfigError, load_config


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_demo_loads_and_overrides(tmp_path):
    cfg = load_config(None, ["train.steps=3", f"run.output_dir={tmp_path}/x", "rollout.group_size=4"])
    assert cfg.train.steps == 3 and cfg.rollout.group_size == 4 and cfg.model.tiny
    assert cfg.run.output_dir == f"{tmp_path}/x"


def test_text_fields_keep_the_text_of_an_override():
    # YAML would read 0123456 as octal 42798 and 1234e56 as a float; a text field keeps what was typed
    cfg = load_config(None, ["model.revision=0123456", "run.name=1234e56", "model.path='a b'", "server.api_key_env="])
    assert (cfg.model.revision, cfg.run.name, cfg.model.path, cfg.server.api_key_env) == ("0123456", "1234e56", "a b", "")
    cfg = load_config(None, ["train.steps=0x10", "rewards.0.weight=2", "data.eval_datasets=[{path: e.txt}]",
                             "run.output_dir=runs/${model.family}"])  # (other fields: YAML values, interpolations)
    assert (cfg.train.steps, cfg.rewards[0].weight, cfg.data.eval_datasets[0].path) == (16, 2.0, "e.txt")
    assert cfg.run.output_dir == "runs/janus"
    # null means null, as in a YAML file: an error on a field that cannot be empty, the text only when quoted
    assert load_config(None, ["model.revision='null'"]).model.revision == "null"
    with pytest.raises(ConfigError, match="model.revision"):
        load_config(None, ["model.revision=null"])


def test_trainable_modules_with_lora_is_a_contradiction():
    # with LoRA only the adapters train: model.trainable used to be ignored without a word
    with pytest.raises(ConfigError, match=r"model.trainable=\['generation_head'\] selects modules for full fine-tuning"):
        load_config(None, ["model.lora.enabled=true", "model.trainable=[generation_head]"])
    assert load_config(None, ["model.lora.enabled=false", "model.trainable=[generation_head]"]).model.trainable


def test_bundled_recipe_by_name():
    assert load_config("demo").model.family == "janus"


def test_env_var_in_value(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGERL_TEST_OUT", str(tmp_path / "o"))
    p = write(tmp_path, "c.yaml", "run:\n  output_dir: ${oc.env:IMAGERL_TEST_OUT}\nmodel: {tiny: true}\n")
    assert load_config(p).run.output_dir == str(tmp_path / "o")
    p2 = write(tmp_path, "d.yaml", "run:\n  output_dir: ${env:IMAGERL_MISSING,fallback}\nmodel: {tiny: true}\n")
    assert load_config(p2).run.output_dir == "fallback"


def test_missing_env_var_or_key_in_a_value_is_one_line_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGERL_NOPE", raising=False)
    p = write(tmp_path, "e.yaml", "model: {tiny: true}\nrun:\n  output_dir: ${oc.env:IMAGERL_NOPE}/x\n")
    with pytest.raises(ConfigError, match=r"^config key 'run.output_dir': .*'IMAGERL_NOPE' not found.*; export it before "
                                          r"the command, or give a default: \$\{oc.env:NAME,default\}$"):
        load_config(p)
    # the short ${env:...} form fails the same way (it used to give None: a silent null scoring.fallback)
    with pytest.raises(ConfigError, match=r"^config key 'scoring.fallback': .*'IMAGERL_NOPE' not found"):
        load_config(None, ["scoring.fallback=${env:IMAGERL_NOPE}"])
    p = write(tmp_path, "k.yaml", "model: {tiny: true}\nrun:\n  output_dir: runs/${model.famly}\n")
    with pytest.raises(ConfigError, match=r"^config key 'run.output_dir': Interpolation key 'model.famly' not found; "):
        load_config(p)
    assert load_config(p, ["run.output_dir=runs/${model.family}"]).run.output_dir == "runs/janus"


def test_jsonnet_with_env_ext_vars(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPS", "7")
    p = write(tmp_path, "c.jsonnet", "{ model: { tiny: true }, train: { steps: std.parseInt(std.extVar('STEPS')) } }")
    assert load_config(p).train.steps == 7
    # a variable that is not set: jsonnet's first line, the place in the user's file, and the fix (not the
    # ten-line trace through std.jsonnet)
    monkeypatch.delenv("STEPS")
    with pytest.raises(ConfigError, match=r"c.jsonnet: jsonnet evaluation failed: RUNTIME ERROR: undefined external "
                                          r"variable: STEPS at .*c.jsonnet:1:\d+-\d+; set the environment variable STEPS"):
        load_config(p)
    # a user's own multi-line `error`: its first line, and the place is a stack frame, not the message's second line
    q = write(tmp_path, "e.jsonnet", '{ train: { steps: error "bad steps\\nuse an int" } }')
    with pytest.raises(ConfigError, match=r"e.jsonnet: jsonnet evaluation failed: RUNTIME ERROR: bad steps at .*e.jsonnet:1"):
        load_config(q)


def test_base_recipes_chain_and_lists_replace(tmp_path):
    # a user's YAML holds only what it changes over a bundled recipe, through a shared file of its own
    (tmp_path / "shared").mkdir()
    write(tmp_path / "shared", "common.yaml", "base: janus_pro_t2i_grpo\nmodel: {tiny: true, tiny_size: test}\n"
                                              "optim: {lr: 3.0e-6}\n")
    p = write(tmp_path, "mine.yaml", "base: shared/common.yaml\noptim: {warmup_steps: 7}\n"
                                     "rewards:\n  - type: brightness\n")
    cfg, recipe = load_config(p), load_config("janus_pro_t2i_grpo", ["model.tiny=true"])
    assert cfg.model.tiny and cfg.model.tiny_size == "test"  # from common.yaml
    assert cfg.optim.lr == 3e-6 and cfg.optim.warmup_steps == 7  # mappings merge key by key
    assert cfg.rollout.cfg_scale == recipe.rollout.cfg_scale == 5.0 and cfg.algorithm.kl_coef == recipe.algorithm.kl_coef
    assert [r.type for r in cfg.rewards] == ["brightness"]  # a list is replaced, not merged by position
    assert load_config(p, ["optim.lr=1e-4"]).optim.lr == 1e-4  # overrides still come last
    # several bases merge in order
    write(tmp_path, "b1.yaml", "train: {steps: 5}\noptim: {lr: 0.5}\n")
    write(tmp_path, "b2.yaml", "train: {steps: 6}\n")
    cfg2 = load_config(write(tmp_path, "two.yaml", "base: [b1.yaml, b2.yaml]\nmodel: {tiny: true}\n"))
    assert (cfg2.train.steps, cfg2.optim.lr) == (6, 0.5)


def test_bundled_name_wins_over_a_directory_of_that_name(tmp_path, monkeypatch):
    # `imagerl train flux_grpo` in a folder that holds a run directory named flux_grpo/
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flux_grpo").mkdir()
    assert load_config("flux_grpo", ["model.tiny=true"]).model.family == "flux"
    (tmp_path / "myrun").mkdir()
    (tmp_path / "myrun" / "config.yaml").write_text("model: {tiny: true}\n")
    with pytest.raises(ConfigError, match=r"'myrun' is a directory, not a config file \(a run's directory: give "
                                          r"myrun/config.yaml, or run.output_dir=myrun"):
        load_config("myrun")
    # the README's configs/<recipe>.yaml outside a checkout (a pip install): the bundled recipe (the checkout's
    # configs/ is a link to the same files); a name that is no recipe still fails
    assert not (tmp_path / "configs").exists()
    assert load_config("configs/flux_grpo.yaml", ["model.tiny=true"]).model.family == "flux"
    with pytest.raises(ConfigError, match=r"'configs/flux_grpp.yaml' does not exist"):
        load_config("configs/flux_grpp.yaml")


def test_dotted_keys_at_the_top_of_a_file(tmp_path):
    # written like the overrides; deeper mappings keep dotted keys as they are (a reward's own args)
    p = write(tmp_path, "d.yaml", "base: demo\ntrain.steps: 5\nrewards.0.weight: 3\noptim:\n  lr: 0.5\n"
                                  "optim.warmup_steps: 4\nmodel.tiny_overrides: {a.b: 1}\n")
    cfg = load_config(p)
    assert (cfg.train.steps, cfg.rewards[0].weight, cfg.rewards[0].type) == (5, 3.0, "color_position")
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (0.5, 4)
    assert cfg.model.tiny_overrides == {"a.b": 1}


def test_base_errors_name_the_file(tmp_path):
    p = write(tmp_path, "a.yaml", "base: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: base 'nope.yaml': config file 'nope.yaml' does not exist.*demo"):
        load_config(p)
    write(tmp_path, "x.yaml", "base: y.yaml\n")
    write(tmp_path, "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match=r"y.yaml: base 'x.yaml' leads back to a file that includes it \(.*x.yaml -> "
                                          r".*y.yaml -> .*x.yaml\)"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match=r"base must name a config file or bundled recipe, or be a list of them"):
        load_config(write(tmp_path, "bad.yaml", "base: {a: 1}\n"))


def test_unknown_key_suggests_closest(tmp_path):
    p = write(tmp_path, "c.yaml", "model: {tiny: true}\ntrain:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stpes.*Did you mean 'train\.steps'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"'optim\.learning_rate'"):
        load_config(None, ["optim.learning_rate=1e-4"])


def test_list_index_overrides_edit_or_append_never_pad(tmp_path):
    # the demo has one reward: index 0 edits it, 1 appends, 3 would invent entries 1 and 2 (default rewards)
    assert [(r.type, r.weight) for r in load_config("demo", ["rewards.0.weight=2"]).rewards] == [("color_position", 2.0)]
    assert [r.type for r in load_config("demo", ["rewards.1.type=brightness"]).rewards] == ["color_position", "brightness"]
    with pytest.raises(ConfigError, match=r"^rewards.3: rewards has 1 entry \(indices 0..0\); to add one, use rewards.1$"):
        load_config("demo", ["rewards.3.type=brightness"])
    p = write(tmp_path, "norew.yaml", "model: {tiny: true}\n")  # no rewards: in the file: entries from .0 on
    with pytest.raises(ConfigError, match=r"^rewards.1: rewards is not set in the config, so its entries must be given "
                                          r"from rewards.0 on without gaps \(got indices \[1\]\)$"):
        load_config(p, ["rewards.1.weight=0.5"])


def test_unknown_key_in_list_entry():
    with pytest.raises(ConfigError, match=r"rewards\.0\.wieght.*Did you mean 'rewards\.0\.weight'"):
        load_config(None, ["rewards.0.wieght=2"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(None, ["train.steps=many"])
    # the full key of a list entry, sections and plain lists: one line each, never a traceback
    for override, match in (("rewards.0.weight=abc", r"^rewards.0.weight=abc: rewards.0.weight takes a number$"),
                            ("train.steps=2.5", r"^train.steps=2.5: train.steps takes an integer$"),
                            ("model.lora=true", r"^model.lora is a section, not a value: set its keys \(e.g. model.lora.enabled"),
                            ("optim.betas.1=0.99", r"^optim.betas.1: optim.betas is a list of values; give it whole")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [override])


def test_bad_choice_names_valid_values():
    with pytest.raises(ConfigError, match=r"algorithm\.loss_agg='tokenmean'.*Did you mean 'token_mean'"):
        load_config(None, ["algorithm.loss_agg=tokenmean"])


def test_cross_field_errors():
    with pytest.raises(ConfigError, match="group_size"):
        load_config(None, ["rollout.group_size=1"])
    with pytest.raises(ConfigError, match="model.path is empty"):
        load_config(None, ["model.tiny=false"])
    with pytest.raises(ConfigError, match="sft_datasets"):
        load_config(None, ["algorithm.sft_weight=0.1"])
    with pytest.raises(ConfigError, match=r"dist\.zero_stage=3.*dist\.strategy=fsdp2"):
        load_config(None, ["dist.strategy=deepspeed", "dist.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"scoring.max_abstain_fraction=1.5 must be in \[0, 1\]"):
        load_config(None, ["scoring.max_abstain_fraction=1.5"])


@pytest.mark.parametrize("override,match", [
    ("logging.samples_per_grid=0", r"logging.samples_per_grid=0 must be > 0"),
    ("optim.grad_clip=-1", r"optim.grad_clip=-1.0 must be >= 0"),  # (was: clipping silently off)
    ("optim.betas=[0.9,1.5]", r"optim.betas=\[0.9, 1.5\]: both must be in \[0, 1\)"),
    ("optim.eps=0", r"optim.eps=0.0 must be > 0"),  # (was: NaN gradient norm at the first step)
    ("data.datasets.0.limit=-1", r"data.datasets\[0\].limit=-1 must be >= 0"),  # (was: the last row dropped)
    ("run.threads=-1", r"run.threads=-1 must be >= 0"),  # (was: a RuntimeError traceback from torch)
    ("algorithm.adv_clip=-0.5", r"algorithm.adv_clip=-0.5 must be >= 0"),
    ("logging.log_every=0", r"logging.log_every=0 must be > 0"),  # (was: silently 1)
    ("rollout.sde_window_range=[0,3]", r"rollout.sde_window_range=\[0, 3\] has no effect with rollout.sde_window=0"),
    ("rewards.0.name=a/b", r"rewards\[0\].name='a/b' contains '/'; use another separator, e.g. 'a_b'"),
    # (a NaN weight made every total NaN: the step then failed with a misleading "every reward abstained")
    ("rewards.0.weight=.nan", r"rewards\[0\].weight=nan must be a finite number"),
    # SFT pairs are drawn by weight as well (0 or a negative one crashed the first SFT step inside torch.multinomial)
    ("data.sft_datasets=[{path: 'builtin:colors', weight: 0}]", r"data.sft_datasets\[0\].weight=0.0 must be a finite "
                                                                r"number > 0"),
    ("data.eval_datasets=[{path: ''}]", r"data.eval_datasets\[0\].path is empty"),
    ("data.datasets.0.reward_weights.color_position=.inf", r"data.datasets\[0\].reward_weights.color_position=inf must "
                                                          r"be a finite number"),
])
def test_out_of_range_numbers_fail_at_load(override, match):
    with pytest.raises(ConfigError, match="^" + match):
        load_config(None, [override])


def test_deepspeed_config_keeps_the_keys_the_loop_owns():
    from imagerl.zero import deepspeed_config

    cfg = load_config(None, ["dist.strategy=deepspeed", "dist.zero_stage=1", "optim.grad_clip=0.5",
                             "dist.deepspeed_extra.zero_optimization.reduce_bucket_size=1000",
                             "dist.deepspeed_extra.gradient_accumulation_steps=8",
                             "dist.deepspeed_extra.zero_optimization.stage=3",
                             "dist.deepspeed_extra.zero_optimization.compute_grad_norm=false",
                             "dist.deepspeed_extra.zero_optimization.elastic_checkpoint=true"])
    conf = deepspeed_config(cfg)
    # extra merged; the stage, the gradient norm (logged, and checked for NaN) and the per-rank partition layout of
    # checkpoints (elastic ones broke every resume) stay the loop's
    assert conf["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000, "compute_grad_norm": True,
                                         "elastic_checkpoint": False}
    assert cfg.dist.deepspeed_extra["zero_optimization"]["stage"] == 3  # the user's dict is not modified
    assert conf["gradient_accumulation_steps"] == 1 and conf["managed_gradient_accumulation"] is False
    assert conf["gradient_clipping"] == 0.5
    assert deepspeed_config(load_config(None, ["optim.grad_clip=0"]))["gradient_clipping"] == 0.0


def test_an_override_that_adds_a_list_entry_must_name_it():
    # an index typo (the demo has one reward) must not add a second reward of the default type
    with pytest.raises(ConfigError, match=r"^rewards.1: rewards has 1 entry, so this adds a new one, which needs its "
                                          r"type: give rewards.1.type=... as well, or change an existing entry \(rewards.0\)$"):
        load_config(None, ["rewards.1.weight=2"])
    with pytest.raises(ConfigError, match=r"^data.datasets.1: .*needs its path: give data.datasets.1.path="):
        load_config(None, ["data.datasets.1.weight=2"])
    cfg = load_config(None, ["rewards.1.type=brightness", "rewards.1.weight=2", "rewards.0.weight=3"])
    assert [(r.type, r.weight) for r in cfg.rewards] == [("color_position", 3.0), ("brightness", 2.0)]
    assert [d.path for d in load_config(None, ["data.datasets.1.path=builtin:colors"]).data.datasets] == ["builtin:colors"] * 2


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")
    # a path with a directory part never falls back to the bundled recipe of the same file name
    with pytest.raises(ConfigError, match=r"'no/such/flux_grpo.yaml' does not exist"):
        load_config("no/such/flux_grpo.yaml")
    with pytest.raises(ConfigError, match=r"base '../missing/demo.yaml': config file .*does not exist"):
        load_config(write(tmp_path, "m.yaml", "base: ../missing/demo.yaml\n"))


def test_bad_yaml(tmp_path):
    p = write(tmp_path, "c.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_zero_partitions_of_another_process_count_are_a_clear_error(tmp_path):
    from imagerl.dist import DistInfo
    from imagerl.zero import ZeroEngine

    # a partial stand-in (an engine without DeepSpeed's state): the count is checked before anything else is read,
    # and a real mismatch needs two DeepSpeed processes (the slow sharded-resume test has them)
    eng = ZeroEngine.__new__(ZeroEngine)
    eng.info = DistInfo(rank=0, world=2)
    with pytest.raises(ValueError, match=r"partitions of 4 processes and this run has 2.*--nproc_per_node 4"):
        eng.load_partition(tmp_path, {"zero_partitions": 4})


def test_cudnn_attention_switch():
    # run.cudnn_attention (default false) turns cuDNN's SDPA kernels off for a CUDA run (their backward gave NaN
    # gradients on an H100); a CPU run leaves torch's process-wide switch alone
    import torch

    from imagerl.devices import configure_attention

    assert load_config(None, []).run.cudnn_attention is False
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        configure_attention(torch.device("cpu"), False)
        assert torch.backends.cuda.cudnn_sdp_enabled()
        configure_attention(torch.device("cuda"), False)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        configure_attention(torch.device("cuda"), True)
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
