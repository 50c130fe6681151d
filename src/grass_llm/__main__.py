import sys

from grass_llm.cli import main

sys.exit(main())
