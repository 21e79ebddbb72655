"""The method's mathematics: the preference losses, token importance and GRPO's objective (docs/method.md)."""
