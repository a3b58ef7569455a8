"""Weight conversion between mmjax models and other frameworks' checkpoints.

`mmjax.convert.hf.load(path)` reads a Hugging Face model directory (config.json + model.safetensors) into an mmjax
linen model and its variables; `mmjax.convert.hf.save` writes one back. The per-family mappings live in
`hf_bert`, `hf_vit`, `hf_clip`, `hf_vilt`, `hf_visual_bert` and `hf_lxmert`.
"""
