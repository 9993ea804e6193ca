#define _GNU_SOURCE
#include "net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "util.h"

static int if_up(int sock, const char *name)
{
	struct ifreq ifr = {0};
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0)
		return -1;
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	return ioctl(sock, SIOCSIFFLAGS, &ifr);
}

static void set_sin(struct sockaddr *sa, struct in_addr a)
{
	struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr = a};
	memcpy(sa, &sin, sizeof sin);
}

/* "10.0.2.15/24" -> address and netmask. */
static int parse_cidr(const char *text, struct in_addr *addr, struct in_addr *mask)
{
	char buf[INET_ADDRSTRLEN + 4];
	unsigned long long prefix = 24;
	snprintf(buf, sizeof buf, "%s", text);
	char *slash = strchr(buf, '/');
	if (slash) {
		*slash = '\0';
		if (parse_uint(slash + 1, &prefix) < 0 || prefix > 32)
			return -1;
	}
	if (inet_pton(AF_INET, buf, addr) != 1)
		return -1;
	mask->s_addr = htonl(prefix ? 0xffffffffu << (32 - prefix) : 0);
	return 0;
}

static int if_addr(int sock, const char *name, const char *cidr)
{
	struct in_addr addr, mask;
	struct ifreq ifr = {0};
	if (parse_cidr(cidr, &addr, &mask) < 0) {
		errno = EINVAL;
		return -1;
	}
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	set_sin(&ifr.ifr_addr, addr);
	if (ioctl(sock, SIOCSIFADDR, &ifr) < 0)
		return -1;
	set_sin(&ifr.ifr_netmask, mask);
	return ioctl(sock, SIOCSIFNETMASK, &ifr);
}

static int default_route(int sock, const char *gw)
{
	struct rtentry rt = {0};
	struct in_addr any = {0}, via;
	if (inet_pton(AF_INET, gw, &via) != 1) {
		errno = EINVAL;
		return -1;
	}
	set_sin(&rt.rt_dst, any);
	set_sin(&rt.rt_genmask, any);
	set_sin(&rt.rt_gateway, via);
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	return ioctl(sock, SIOCADDRT, &rt);
}

static void write_etc(const struct bootargs *args, const char *hostname)
{
	char hosts[512];
	snprintf(hosts, sizeof hosts,
		 "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
	if (hostname) {
		char ip[INET_ADDRSTRLEN + 4] = "127.0.1.1";
		if (args->ip)
			snprintf(ip, sizeof ip, "%.*s", (int)strcspn(args->ip, "/"), args->ip);
		size_t n = strlen(hosts);
		snprintf(hosts + n, sizeof hosts - n, "%s\t%s\n", ip, hostname);
	}
	/* Replace rather than follow: images often ship these as symlinks into
	 * /run (systemd-resolved) that lead nowhere here. */
	unlink("/etc/hosts");
	if (write_text_file("/etc/hosts", hosts, 0644) < 0)
		log_msg("cannot write /etc/hosts: %s", strerror(errno));
	if (args->dns) {
		char resolv[256];
		snprintf(resolv, sizeof resolv, "nameserver %s\n", args->dns);
		unlink("/etc/resolv.conf");
		if (write_text_file("/etc/resolv.conf", resolv, 0644) < 0)
			log_msg("cannot write /etc/resolv.conf: %s", strerror(errno));
	}
}

void net_setup(const struct bootargs *args, const char *hostname, int etc_writable)
{
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0) {
		log_msg("no IPv4 socket: %s", strerror(errno));
	} else {
		if (if_up(sock, "lo") < 0)
			log_msg("cannot bring lo up: %s", strerror(errno));
		if (args->ip && (if_addr(sock, NET_IFACE, args->ip) < 0 || if_up(sock, NET_IFACE) < 0))
			log_msg("cannot configure %s as %s: %s", NET_IFACE, args->ip, strerror(errno));
		else if (args->ip && args->gw && default_route(sock, args->gw) < 0)
			log_msg("cannot add default route via %s: %s", args->gw, strerror(errno));
		close(sock);
	}
	if (hostname && sethostname(hostname, strlen(hostname)) < 0)
		log_msg("cannot set hostname %s: %s", hostname, strerror(errno));
	if (etc_writable && access("/etc", F_OK) == 0)
		write_etc(args, hostname);
}
