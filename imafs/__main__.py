from imafs.cli import main

raise SystemExit(main())
