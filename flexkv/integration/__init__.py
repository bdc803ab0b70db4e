"""Module paths the engines' built-in FlexKV hooks import."""
