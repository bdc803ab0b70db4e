"""flexkv.core: the control plane (config, KVManager, tiers, CLI)."""
