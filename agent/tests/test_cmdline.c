/* The vmimg.* kernel parameters. */
#include <stdlib.h>

#include "check.h"
#include "cmdline.h"

int main(void)
{
	struct bootargs a;
	char line[] = "BOOT_IMAGE=/vmlinuz console=ttyS0 rdinit=/.vmimg/init vmimg.mode=verify "
		      "vmimg.deep=1 vmimg.ip=10.0.2.15/24 vmimg.gw=10.0.2.2 vmimg.dns=10.0.2.3 "
		      "vmimg.smoke=\"echo hi there\" \"vmimg.cmd=ls -l\" vmimg.hostname=h1\n";
	cmdline_parse(line, &a);
	CHECK(a.mode == MODE_VERIFY);
	CHECK(a.deep == 1);
	CHECK_STR(a.ip, "10.0.2.15/24");
	CHECK_STR(a.gw, "10.0.2.2");
	CHECK_STR(a.dns, "10.0.2.3");
	CHECK_STR(a.smoke, "echo hi there");
	CHECK_STR(a.cmd, "ls -l");
	CHECK_STR(a.hostname, "h1");
	CHECK(a.bad == NULL);

	char plain[] = "console=ttyS0 quiet";
	cmdline_parse(plain, &a);
	CHECK(a.mode == MODE_RUN && a.deep == 0 && a.ip == NULL && a.cmd == NULL);

	char check[] = "vmimg.mode=check";
	cmdline_parse(check, &a);
	CHECK(a.mode == MODE_CHECK && a.bad == NULL);

	char odd[] = "vmimg.mode=fly vmimg.deep=0 vmimg.colour=red";
	cmdline_parse(odd, &a);
	CHECK(a.mode == MODE_RUN && a.deep == 0);
	CHECK(a.bad != NULL && !strncmp(a.bad, "vmimg.mode", 10));

	/* how the VM ends: detected unless the launcher says */
	CHECK(a.shutdown == SHUTDOWN_AUTO);
	CHECK(a.kernel_reboot == 0);
	char reboot[] = "reboot=k vmimg.shutdown=reboot";
	cmdline_parse(reboot, &a);
	CHECK(a.shutdown == SHUTDOWN_REBOOT && a.bad == NULL && a.kernel_reboot == 1);
	char off[] = "vmimg.shutdown=poweroff";
	cmdline_parse(off, &a);
	CHECK(a.shutdown == SHUTDOWN_POWEROFF && a.bad == NULL);
	char halt[] = "vmimg.shutdown=halt";
	cmdline_parse(halt, &a);
	CHECK(a.shutdown == SHUTDOWN_AUTO && a.bad != NULL);
	return check_done("cmdline");
}
