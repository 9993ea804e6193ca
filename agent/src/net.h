/* Loopback, eth0 from vmimg.ip / vmimg.gw, /etc/hosts, /etc/resolv.conf and
 * the hostname. Network problems are logged, never fatal: a workload that
 * needs no network should still run. */
#ifndef VMIMG_NET_H
#define VMIMG_NET_H

#include "cmdline.h"

#define NET_IFACE "eth0"

/* hostname may be NULL (keep the kernel's). */
void net_setup(const struct bootargs *args, const char *hostname, int write_etc);

#endif
