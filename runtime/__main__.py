"""``python -m runtime`` is ``python -m runtime.run`` (classify a camera, stream, video, image or folder)."""

from __future__ import annotations

import sys

from runtime.run import main

if __name__ == "__main__":
    sys.exit(main())
