"""The one answer to "does this method train adapters beside a frozen base?" (so that base is there with them off)."""

ADAPTER_METHODS = ("lora", "qlora")


def trains_adapters(method: str) -> bool:
    return method in ADAPTER_METHODS
