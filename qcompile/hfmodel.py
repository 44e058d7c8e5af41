"""transformers models built from a config file with random weights: what ``qcompile dump
--model`` and ``qcompile warmup --model`` work on, for users who have a config but not (or not
yet) the weights."""
import json
from pathlib import Path

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # the CLI's --dtype names


def load_config(path: str, layers: int | None = None):
    """A transformers config from CONFIG.json (a ``config.json`` as the Hub ships it, or a
    folder holding one); ``layers`` overrides ``num_hidden_layers``."""
    import transformers
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    data = json.loads(path.read_text())
    if "model_type" not in data:
        raise ValueError(f"{path}: a config needs a 'model_type' (e.g. \"llama\") to say which model it builds")
    config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    if layers:
        config.num_hidden_layers = layers
    return config


def build(config, device, dtype: torch.dtype):
    """The causal LM of ``config`` with random weights on ``device`` ("meta": shapes only)."""
    import transformers
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
