"""Rewards by name. Registration is lazy (module:attr) so that building one reward imports only its module."""

from ..registry import REWARDS

for _name, _target in {
    # rule scorers on pixels (learnable by tiny models)
    "color_position": "imagerl.rewards.rule:ColorPositionReward",
    "brightness": "imagerl.rewards.rule:BrightnessReward",
    "jpeg_compressibility": "imagerl.rewards.rule:JpegCompressibilityReward",
    # OCR and CLIP-family scorers
    "ocr": "imagerl.rewards.ocr:OCRReward",
    "clip_score": "imagerl.rewards.clip:CLIPScoreReward",
    "pickscore": "imagerl.rewards.clip:PickScoreReward",
    "hps": "imagerl.rewards.clip:HPSReward",
    # VLM judges (backends: HTTP OpenAI-compatible or in-process)
    "yes_no_judge": "imagerl.rewards.judges.rewards:YesNoJudge",
    "viescore": "imagerl.rewards.judges.rewards:VIEScoreJudge",
    "pairwise_judge": "imagerl.rewards.judges.rewards:PairwiseJudge",
    "rubric_judge": "imagerl.rewards.judges.rewards:RubricJudge",
    "edit_judge": "imagerl.rewards.judges.rewards:EditJudge",
    # our reward server
    "remote": "imagerl.rewards.remote:RemoteReward",
    # combinations and text-format rules
    "weighted_sum": "imagerl.rewards.combine:WeightedSum",
    "gated": "imagerl.rewards.combine:Gated",
    "product": "imagerl.rewards.combine:Product",
    "max_deviation": "imagerl.rewards.combine:MaxDeviation",
    "format": "imagerl.rewards.format:TagFormatReward",
}.items():
    REWARDS.register_lazy(_name, _target)
