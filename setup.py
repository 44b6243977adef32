from setuptools import find_packages, setup

setup(
    name="rproxy",
    version="0.1.0",
    description="A reverse proxy for gunicorn/gevent shops, configured by one INI file",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rproxy", "rproxy.*"]),
    python_requires=">=3.10",
    install_requires=[
        "gunicorn>=27.0,<28",
        # gunicorn's C request parser (what gunicorn[fast] brings, whose pin
        # is newer than the registry has): gunicorn picks it up by itself.
        "gunicorn_h1c>=0.6.10,<0.7",
        "gevent>=24.10.1",
        "urllib3>=2.2,<3",
        "gevent-websocket>=0.10,<0.11",
        "limits>=5.0,<6",
        "requests-toolbelt>=1.0,<2",
        "PasteDeploy>=3.0,<4",
        "redis>=5,<9",
        "prometheus-client>=0.20,<1",
        "h2>=4.1,<5",
        "acme>=5.0,<6",
        "cryptography>=42",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "requests>=2.31,<3",
            "psutil>=5.9",
            "websocket-client>=1.7,<2",
            "websockets>=13",
            "trustme>=1.1",
            "hypothesis>=6.100",
            "httpx[http2]>=0.27,<1",
        ],
    },
    entry_points={
        "console_scripts": ["rproxy = rproxy.cli:main"],
        "paste.app_factory": ["main = rproxy.app:paste_app_factory"],
    },
)
