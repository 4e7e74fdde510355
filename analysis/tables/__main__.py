"""``python -m analysis.tables --results <folder of records> --out <folder>``: every table, as files."""

import sys

from analysis.tables.build import main

sys.exit(main())
