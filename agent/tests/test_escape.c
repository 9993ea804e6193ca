/* Percent escaping shared by the config, the manifest and the markers. */
#include "check.h"
#include "util.h"

static void roundtrip(const char *raw)
{
	char buf[1024] = "";
	CHECK(escape_append(buf, sizeof buf, raw) == 0);
	/* escaped text never holds a space, a newline or a control byte */
	for (const unsigned char *p = (const unsigned char *)buf; *p; p++)
		CHECK(*p > 0x20 && *p < 0x7f);
	CHECK(unescape(buf) == (long)strlen(raw));
	CHECK_STR(buf, raw);
}

int main(void)
{
	char s1[] = "a%20b%25c%0Ad";
	CHECK(unescape(s1) == 7);
	CHECK_STR(s1, "a b%c\nd");

	char lower[] = "%c3%a9";
	CHECK(unescape(lower) == 2);
	CHECK_STR(lower, "\xc3\xa9");

	char bad1[] = "abc%2", bad2[] = "%zz", nul[] = "x%00y", trailing[] = "%";
	CHECK(unescape(bad1) == -1);
	CHECK(unescape(bad2) == -1);
	CHECK(unescape(nul) == -1);
	CHECK(unescape(trailing) == -1);

	char out[32] = "";
	CHECK(escape_append(out, sizeof out, "a b%") == 0);
	CHECK_STR(out, "a%20b%25");
	char small[5] = "";
	CHECK(escape_append(small, sizeof small, "  ") == -1);

	roundtrip("");
	roundtrip("plain/path-with_chars.txt");
	roundtrip("tab\tnew\nline\r \x7f\x01\xff%%");
	char all[256];
	for (int i = 1; i < 256; i++)
		all[i - 1] = (char)i;
	all[255] = '\0';
	roundtrip(all);

	unsigned long long v;
	CHECK(parse_uint("0", &v) == 0 && v == 0);
	CHECK(parse_uint("18446744073709551615", &v) == 0 && v == 18446744073709551615ULL);
	CHECK(parse_uint("18446744073709551616", &v) == -1);
	CHECK(parse_uint("", &v) == -1);
	CHECK(parse_uint("12a", &v) == -1);
	CHECK(parse_uint("-1", &v) == -1);
	return check_done("escape");
}
