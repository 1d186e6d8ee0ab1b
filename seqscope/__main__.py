import sys

from seqscope.cli import main

sys.exit(main())
