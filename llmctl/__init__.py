"""llmctl: train small language models from scratch on your own hardware.

Nothing heavy is imported here, so `llmctl --help` stays instant.
"""

__version__ = "0.1.0"
