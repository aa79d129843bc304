import sys

from fl_client.cli import main

sys.exit(main())
