import sys

from jaxlora_cli.main import main

sys.exit(main())
