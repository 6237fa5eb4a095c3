"""Policy adapters by name (lazy: building one imports only its family's module)."""

from ..registry import POLICIES

for _name, _target in {
    "janus": "imagerl.policies.ar.janus:JanusPolicy",
    "sd3": "imagerl.policies.flow.sd3:SD3Policy",
    "flux": "imagerl.policies.flow.flux:FluxPolicy",
    "qwen_image": "imagerl.policies.flow.qwen_image:QwenImagePolicy",
}.items():
    POLICIES.register_lazy(_name, _target)
