"""minigpt4_min: MiniGPT-4 (Zhu et al., 2023, arXiv 2304.10592), rebuilt step by step.

A frozen BLIP-2 encoder (ViT + Q-Former) -> ONE trainable `nn.Linear` -> a frozen chat
LLM, at two scales with one code path: `tiny` (ShapesWorld, CPU, offline) and the full
Vicuna / Llama-2 variants. See README.md for the map of modules and notebooks.
"""
__version__ = "0.1.0"
