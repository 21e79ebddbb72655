"""`make stress`: reliability checks that take minutes: bad input, crashes, concurrency, registry safety."""
