"""Module paths SGLang's ``--enable-flexkv`` imports."""
