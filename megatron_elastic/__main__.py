import sys

from megatron_elastic.cli import main

sys.exit(main())
