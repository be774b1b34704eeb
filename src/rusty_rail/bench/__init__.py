"""`rusty-rail bench`: the benchmark report (Markdown with PNG plots) and the measurements behind it.

Above the lab in the layers (it builds labs to measure in); nothing below imports it.

    e2e.py            real tools (iperf3, wrk + nginx) through the lab: Rusty Rail against the direct
                      path, GRE without a balancer, HAProxy and nftables DNAT
    peers.py          the configurations of nginx, HAProxy and nftables, generated into the lab
    maglev_paper.py   balance and disruption of the Maglev table, in the paper's terms
    maglev_build.py   the table build against a C -O2 Pseudocode 1
    report.py, plots.py, cli.py   the report, its plots and the command
"""
