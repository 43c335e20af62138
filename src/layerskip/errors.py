"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class LayerSkipError(Exception):
    """Bad input from the user (model path, flags, prompt). Never raised for a bug in layerskip."""
