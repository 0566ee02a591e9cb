from vsproxy.cli import main

raise SystemExit(main())
