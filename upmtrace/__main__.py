from upmtrace.cli import main

main()
