"""Re-export of :mod:`recval_ray.core.errors` (error types live in the core, which cannot import upwards)."""
from .core.errors import (ConfigError, InputError, OutputError, OutputExistsError, OutputLockedError,  # noqa: F401
                          OutputVerificationError, RecvalError)
