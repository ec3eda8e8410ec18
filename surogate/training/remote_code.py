"""Models that ship their own modeling code (`auto_map` in config.json naming Python files of the folder or hub
repo: InternLM2, MiniCPM, Baichuan, ChatGLM, Qwen-1, ...). transformers runs that code only with
`trust_remote_code=True`; asked with None it prompts on a terminal (a run would wait there), so every load the trainer
makes passes the config key `trust_remote_code` explicitly, and a model that needs it without the key is refused in
one line (`refusal`) before anything loads."""

from __future__ import annotations


def needs_remote_code(name: str) -> bool:
    """Whether `name`'s config names its own code for a model type transformers does not know (what transformers
    refuses to load without `trust_remote_code=True`). Reads config.json alone (the folder's, or the hub's)."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        raw, _ = PretrainedConfig.get_config_dict(name)
    except (OSError, ValueError):
        return False
    auto_map = raw.get("auto_map") or {}
    return bool(auto_map) and raw.get("model_type") not in CONFIG_MAPPING


def code_files(name: str) -> list[str]:
    """The Python files `name`'s config.json maps its classes to (for the message)."""
    from transformers import PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(name)
    except (OSError, ValueError):
        return []
    refs = [ref for ref in (raw.get("auto_map") or {}).values() for ref in (ref if isinstance(ref, list) else [ref])]
    return sorted({f"{ref.split('--')[-1].rsplit('.', 1)[0]}.py" for ref in refs if isinstance(ref, str)})


def refusal(key: str, name: str) -> str:
    """The one line for a model that needs remote code and lacks the option (`surogate merge`'s BASE: the flag)."""
    files = ", ".join(code_files(name)) or "its own Python files"
    option = "pass --trust-remote-code" if key == "BASE" else "set trust_remote_code: true"
    return (f"{key}: {name} ships its own modeling code ({files}, named by auto_map in its config.json); {option} "
            "to load it (that runs its Python code on this machine: read it first)")

