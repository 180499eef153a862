"""Qwen-Image prompt templates and drop indices (as in diffusers 0.42's pipelines).

The text encoder sees ``TEMPLATE.format(prompt)``; the first ``DROP`` tokens (system prompt up to
and including ``<|im_start|>user\\n``) are removed from its last hidden states.
"""

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
T2I_DROP = 34
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_DROP = 64
USER_MARK = "<|im_start|>user\n"


def template_prefix(template: str) -> str:
    """The part of ``template`` that the drop index removes (up to and including the user mark)."""
    return template[: template.index(USER_MARK) + len(USER_MARK)]
