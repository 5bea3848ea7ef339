pytest_plugins = [
    "tests.fixtures.triton",
]
