import sys

from fl_client.admin.cli import main

sys.exit(main())
