"""Rule rewards on hand-made images."""

import math

import pytest
import torch

from imagerl.data.pairs import draw_shape
from imagerl.rewards.base import RewardSet, build_reward
from imagerl.types import RewardInput


def inp(images, prompts, metas=None):
    return RewardInput(images=images, prompts=prompts, metadata=metas or [{} for _ in prompts])


def test_color_position_prefers_the_described_image():
    r = build_reward({"type": "color_position", "args": {}})
    good = draw_shape("red", "square", "left", 32)
    wrong_side = draw_shape("red", "square", "right", 32)
    wrong_color = draw_shape("blue", "square", "left", 32)
    full_red = torch.zeros(3, 32, 32)
    full_red[0] = 1
    left_red = torch.full((3, 32, 32), 0.5)
    left_red[:, :, :16] = torch.tensor([1.0, 0, 0]).view(3, 1, 1)
    out = r(inp(torch.stack([good, wrong_side, wrong_color, left_red, full_red]), ["a red square on the left"] * 5))
    s = out.scores
    grey_match = 1 - 0.5 / 0.6  # grey (0.5,0.5,0.5) is at RGB distance 0.5 (normalised) from red, tolerance 0.6
    assert s[3] == pytest.approx(0.75 * 1.0 + 0.25 * (1 - grey_match))  # perfect region, grey outside
    assert s[0] > s[1] and s[0] > s[2]
    assert s[4] == pytest.approx(0.75)  # red everywhere: region matches, leak penalised


def test_color_position_abstains_without_colour():
    r = build_reward({"type": "color_position"})
    out = r(inp(torch.rand(2, 3, 8, 8), ["a photo of a cat", "a green square"]))
    assert math.isnan(out.scores[0]) and not math.isnan(out.scores[1])
    assert out.num_abstain == 1
    # a metadata position it cannot check abstains (the whole image as the region would give 0.25 for nothing)
    blue = torch.zeros(2, 3, 8, 8)
    blue[:, 2] = 1
    out = r(inp(blue, ["a red square", "a red square"], [{"position": "middle"}, {"position": "left"}]))
    assert math.isnan(out.scores[0]) and out.scores[1] == pytest.approx(0.25)  # (left: all-blue leaks nothing)
    # blank metadata (an empty CSV cell) is missing: the prompt says what to check
    from imagerl.rewards.rule import ColorPositionReward

    assert ColorPositionReward.parse("a red square on the left", {"color": "", "position": ""}) == ("red", "left")
    # metadata as a person types it in a CSV ("Red", " Left") is the prompt's words
    assert ColorPositionReward.parse("a square", {"color": "Red", "position": " Left"}) == ("red", "left")


def test_brightness_and_jpeg():
    imgs = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16), torch.rand(3, 16, 16)])
    b = build_reward({"type": "brightness"})(inp(imgs, ["x"] * 3)).scores
    assert b[0] == pytest.approx(0.0) and b[1] == pytest.approx(1.0, abs=1e-6)
    j = build_reward({"type": "jpeg_compressibility"})(inp(imgs, ["x"] * 3)).scores
    assert j[0] > j[2] and j[1] > j[2]  # flat images compress better than noise
    # a flat image costs nothing beyond the format's own bytes (scores 1 at any size, 16 px included, where the
    # headers alone are 2.4 bytes per pixel), and noise still scores above 0 there: the reward can move
    assert j[0] == pytest.approx(1.0, abs=0.01) and j[1] == pytest.approx(1.0, abs=0.01) and 0.0 < j[2] < 0.9
    # a hand count: the file's bytes minus the flat image's, per pixel, against max_bpp
    import io as _io

    from PIL import Image

    from imagerl.imageio import to_u8
    from imagerl.rewards.rule import jpeg_floor_bytes

    buf = _io.BytesIO()
    Image.fromarray(to_u8(imgs[2:3])[0]).save(buf, format="JPEG", quality=95)
    assert float(j[2]) == pytest.approx(1 - (buf.tell() - jpeg_floor_bytes(16, 16, 95)) / 256 / 3.0, rel=1e-6)


def test_bad_reward_args_are_named():
    with pytest.raises(ValueError, match=r"rewards\[0\].args.tolerence.*Did you mean 'tolerance'"):
        build_reward({"type": "color_position", "args": {"tolerence": 0.5}})
    with pytest.raises(ValueError, match=r"rewards\[0\].type.*color_position"):
        build_reward({"type": "colour_position"})


def test_reward_arg_types_are_checked_by_the_constructor_annotations():
    with pytest.raises(ValueError, match=r"^rewards\[3\].args.tolerance='abc' must be a float \(ColorPositionReward\)$"):
        build_reward({"type": "color_position", "args": {"tolerance": "abc"}}, 3)
    with pytest.raises(ValueError, match=r"^rewards\[0\].args.tolerance=True must be a float"):
        build_reward({"type": "color_position", "args": {"tolerance": True}})
    assert build_reward({"type": "color_position", "args": {"tolerance": 1}}).tolerance == 1  # an int is a float


def test_reward_set_weights_and_per_dataset_overrides():
    rs = RewardSet([{"type": "brightness", "weight": 2.0}, {"type": "brightness", "name": "dark", "weight": 1.0, "args": {"target": "dark"}}])
    assert rs.names == ["brightness", "dark"]
    t = rs.score(inp(torch.ones(2, 3, 4, 4), ["a", "b"]), [{}, {"dark": 5.0}])
    assert torch.allclose(t.weights, torch.tensor([[2.0, 1.0], [2.0, 5.0]]))
    assert torch.allclose(t.weighted_total(), torch.tensor([2.0, 2.0]))


def test_nan_pixels_are_an_error_naming_the_samples():
    imgs = torch.rand(3, 3, 4, 4)
    imgs[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"1 of 3 generated images contain NaN/inf pixels \(samples \[1\], first prompt 'b'\)"):
        inp(imgs, ["a", "b", "c"])


def test_null_args_are_no_args_and_other_args_are_named():
    assert build_reward({"type": "brightness", "args": None}).name == "brightness"  # YAML `args:` with nothing after
    with pytest.raises(ValueError, match=r"rewards\[2\].args must be a mapping"):
        build_reward({"type": "brightness", "args": [1]}, 2)


def test_score_count_is_checked_also_for_async_rewards():
    from imagerl.rewards.base import Reward
    from imagerl.types import RewardOutput

    class Short(Reward):  # overrides score_async (as a remote reward does), so Reward.__call__'s check never runs
        is_remote = True

        async def score_async(self, inp):
            return RewardOutput(scores=torch.zeros(len(inp) - 1))

    rs = RewardSet([{"type": "brightness"}])
    rs.rewards, rs.names = [Short("short")], ["short"]
    with pytest.raises(RuntimeError, match=r"reward 'short' returned scores of shape \(3,\) for 4 samples"):
        rs.score(inp(torch.rand(4, 3, 4, 4), list("abcd")))
    # a plain (sync) reward too: the same RewardError (one line from the CLI, not a traceback through the thread pool)
    from imagerl.rewards.base import BadScoresError

    class ShortSync(Reward):
        def score(self, inp):
            return RewardOutput(scores=torch.zeros(len(inp) - 1))

    with pytest.raises(BadScoresError, match=r"^reward 'short' returned scores of shape \(3,\) for 4 samples \(one score "
                                             r"per sample, NaN to abstain\)$"):
        ShortSync("short")(inp(torch.rand(4, 3, 4, 4), list("abcd")))


def test_infinite_score_is_an_error():
    from imagerl.rewards.base import Reward
    from imagerl.types import RewardOutput
    from imagerl.registry import REWARDS

    class Broken(Reward):
        def score(self, inp):
            return RewardOutput(scores=torch.tensor([float("inf")]))

    REWARDS.register("broken_inf_test", Broken)
    with pytest.raises(RuntimeError, match="broken_inf_test.*infinite"):
        RewardSet([{"type": "broken_inf_test"}]).score(inp(torch.zeros(1, 3, 2, 2), ["x"]))


@pytest.mark.parametrize("inside_weight", [-0.1, 1.5, 2.0, float("nan")])
def test_color_position_inside_weight_outside_0_1_is_refused_at_build(inside_weight):
    # inside_weight=2 scored a grey image -0.5: outside [0, 1] one term's weight is negative
    with pytest.raises(ValueError, match=r"^rewards\[1\].args.inside_weight=.* must be in \[0, 1\]"):
        build_reward({"type": "color_position", "args": {"inside_weight": inside_weight}}, 1)


def test_color_position_inside_weight_bounds_keep_scores_in_0_1():
    grey = torch.full((1, 3, 16, 16), 0.5)
    for w in (0.0, 1.0):
        s = build_reward({"type": "color_position", "args": {"inside_weight": w}})(inp(grey, ["a red square on the left"]))
        assert 0.0 <= float(s.scores[0]) <= 1.0


@pytest.mark.parametrize("max_bpp", [0, 0.0, -1.0, float("inf"), float("nan")])
def test_jpeg_max_bpp_must_be_positive_at_build(max_bpp):
    # max_bpp=0 was a ZeroDivisionError at the first score, not at build time
    with pytest.raises(ValueError, match=r"^rewards\[0\].args.max_bpp=.* must be a finite number > 0"):
        build_reward({"type": "jpeg_compressibility", "args": {"max_bpp": max_bpp}})


@pytest.mark.parametrize("quality", [0, -5, 96, 100, 101])
def test_jpeg_quality_must_be_1_to_95_at_build(quality):
    with pytest.raises(ValueError, match=r"^rewards\[0\].args.quality=.* must be an int in 1\.\.95"):
        build_reward({"type": "jpeg_compressibility", "args": {"quality": quality}})
    # constructed directly (not from a config), the error names the reward
    from imagerl.rewards.rule import JpegCompressibilityReward

    with pytest.raises(ValueError, match=r"^reward 'jpeg'.args.quality="):
        JpegCompressibilityReward(name="jpeg", quality=quality)


def test_jpeg_quality_and_max_bpp_bounds_are_valid():
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for args in ({"quality": 1}, {"quality": 95}, {"max_bpp": 0.01}):
        s = build_reward({"type": "jpeg_compressibility", "args": args})(inp(imgs, ["x", "y"])).scores
        assert ((s >= 0) & (s <= 1)).all()
