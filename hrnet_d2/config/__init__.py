"""Config keys (``add_hrnet_config``), the shipped YAMLs (``get_config_file``, ``get_hrnet_cfg``),
the checks of a whole config or model (``validate``) and LazyConfig helpers (``lazy``)."""

from .defaults import CONFIG_DIR, add_hrnet_config, get_config_file, get_hrnet_cfg

__all__ = ["CONFIG_DIR", "add_hrnet_config", "get_config_file", "get_hrnet_cfg"]
