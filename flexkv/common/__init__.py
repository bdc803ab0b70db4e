"""``flexkv.common``: the module paths upstream FlexKV users and engine hooks import."""
