from __future__ import annotations

from ckptfs.cli.main import main

raise SystemExit(main())
