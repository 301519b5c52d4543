"""The demos: the whole method on built-in digits, plain and guided."""
