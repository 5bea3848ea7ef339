pytest_plugins = [
    "tests.fixtures.triton",
    "tests.fixtures.otlp",
    "tests.fixtures.preprocessing",
]
