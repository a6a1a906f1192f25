"""The error memfit.deepspeed raises where DeepSpeed asserts against a misuse of its API."""


class DeepSpeedUsageError(ValueError, AssertionError):
    """A misuse of DeepSpeed's API: no model, two configs, a scheduler built over another
    optimizer, backward or step with no optimizer. A ValueError, as memfit's errors for what a
    user did are, and an AssertionError, as DeepSpeed raises for the same misuse, so that code
    written against DeepSpeed catches it unchanged."""
