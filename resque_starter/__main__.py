from resque_starter.cli import main

raise SystemExit(main())
