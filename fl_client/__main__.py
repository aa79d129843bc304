import sys

from fl_client.site.cli import main

sys.exit(main())
