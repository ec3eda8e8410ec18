"""Models that ship their own modeling code (`auto_map` in config.json naming Python files of the folder or hub
repo: InternLM2, MiniCPM, Baichuan, ChatGLM, Qwen-1, ...). transformers runs that code only with
`trust_remote_code=True`; asked with None it prompts on a terminal (a run would wait there), so every load the trainer
makes passes the config key `trust_remote_code` explicitly, and a model that needs it without the key is refused in
one line (`refusal`) before anything loads."""

from __future__ import annotations


def needs_remote_code(name: str) -> bool:
    """Whether `name`'s config names its own code for a model type transformers does not know (what transformers
    refuses to load without `trust_remote_code=True`). Reads config.json alone (the folder's, or the hub's)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = _model_config(name)
    return bool(raw.get("auto_map")) and raw.get("model_type") not in CONFIG_MAPPING


def _model_config(name: str) -> dict:
    """`name`'s config.json as a dict ({} when it cannot be read)."""
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(name)[0]
    except (OSError, ValueError):
        return {}


def tokenizer_needs_remote_code(name: str) -> bool:
    """Whether `name`'s tokenizer_config.json maps AutoTokenizer to its own code for a tokenizer class transformers
    does not have (one it has loads as transformers' class without the option)."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = _tokenizer_config(name)
    known = config.get("tokenizer_class") and tokenizer_class_from_name(config["tokenizer_class"]) is not None
    return bool((config.get("auto_map") or {}).get("AutoTokenizer")) and not known


def _tokenizer_config(name: str) -> dict:
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    try:
        return get_tokenizer_config(name)
    except (OSError, ValueError):
        return {}


def code_files(name: str, tokenizer: bool = False) -> list[str]:
    """The Python files `name`'s config.json (`tokenizer`: tokenizer_config.json) maps its classes to."""
    auto_map = (_tokenizer_config(name) if tokenizer else _model_config(name)).get("auto_map") or {}
    refs = [ref for ref in auto_map.values() for ref in (ref if isinstance(ref, (list, tuple)) else [ref])]
    return sorted({f"{ref.split('--')[-1].rsplit('.', 1)[0]}.py" for ref in refs if isinstance(ref, str)})


def refusal(key: str, name: str, tokenizer: bool = False) -> str:
    """The one line for a model (`tokenizer`: a tokenizer) that needs remote code and lacks the option (`surogate
    merge`'s BASE: the flag)."""
    files = ", ".join(code_files(name, tokenizer)) or "its own Python files"
    what, where = ("tokenizer", "tokenizer_config.json") if tokenizer else ("modeling", "config.json")
    option = "pass --trust-remote-code" if key == "BASE" else "set trust_remote_code: true"
    return (f"{key}: {name} ships its own {what} code ({files}, named by auto_map in its {where}); {option} "
            "to load it (that runs its Python code on this machine: read it first)")

